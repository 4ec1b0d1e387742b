"""GPT-2's architecture and weights: conversion both ways, `eval --hf`, `train --init-from`,
safetensors checkpoints. Offline: random-weight GPT-2s saved to local folders."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from scratchformer import cli, data  # noqa: E402
from scratchformer.config import GPT2  # noqa: E402
from scratchformer.hf import ConversionError, from_hf, to_hf  # noqa: E402
from scratchformer.model import GPT  # noqa: E402
from scratchformer.tokenizer import BPETokenizer  # noqa: E402
from scratchformer.records import load_checkpoint, model_from_checkpoint  # noqa: E402


def random_gpt2(vocab=300, context=32, d_model=128, heads=2, layers=2, **kw):
    """A GPT-2 with random weights, biases and LayerNorm parameters included (not their 0/1 init)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=d_model, n_head=heads, n_layer=layers,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kw)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_hf_gpt2_converted_gives_the_same_logits_and_round_trips_exactly(tied):
    hf = random_gpt2(tie_word_embeddings=tied)
    ours = from_hf(hf).eval()
    assert ours.config.positions == "learned" and ours.config.tie_embeddings == tied and (ours.head is None) == tied
    idx = torch.randint(0, 300, (3, 32))
    torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)
    back = to_hf(ours).state_dict()
    expected = hf.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_a_gpt2_state_dict_in_any_of_its_spellings():
    hf = random_gpt2(d_model=768, heads=12, layers=1)  # GPT-2 small's width: 12 heads, as a state dict alone implies
    reference = from_hf(hf).state_dict()
    state = hf.state_dict()
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    old = dict(bare) | {"h.0.attn.bias": torch.ones(1, 1, 32, 32), "h.0.attn.masked_bias": torch.tensor(-1e4)}  # older files
    for sd in (state, bare, old):
        model = from_hf(sd)
        assert model.config == from_hf(hf).config
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConversionError, match="weights left over .*h.0.extra"):
        from_hf(bare | {"h.0.extra": torch.zeros(1)})
    with pytest.raises(ConversionError, match="not a GPT-2 state dict"):
        from_hf({"embedding.weight": torch.zeros(3, 4)})
    odd = random_gpt2(d_model=64, heads=4).state_dict()  # not a published size: the head count is unknown
    with pytest.raises(ConversionError, match="does not say how many heads its 64 channels form"):
        from_hf(odd)
    assert from_hf(odd, config=random_gpt2(d_model=64, heads=4).config).config.n_heads == 4
    missing = {k: v for k, v in bare.items() if k != "h.0.ln_2.bias"}
    with pytest.raises(ConversionError, match="not a complete GPT-2 state dict: h.0.ln_2.bias is missing"):
        from_hf(missing)


def test_from_hf_takes_a_folder_as_the_cli_does(tmp_path):
    hf = random_gpt2()
    hf.save_pretrained(tmp_path / "gpt2")
    idx = torch.randint(0, 300, (2, 32))
    torch.testing.assert_close(from_hf(str(tmp_path / "gpt2")).eval()(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_hf(tmp_path / "gpt2").eval()(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConversionError, match="cannot load it"):
        from_hf(str(tmp_path / "nothing-here"))


def test_what_the_conversion_refuses():
    with pytest.raises(ConversionError, match="scale_attn_by_inverse_layer_idx=True"):
        from_hf(random_gpt2(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ConversionError, match="activation 'silu'"):
        from_hf(random_gpt2(activation_function="silu"))
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                                         num_hidden_layers=1, num_attention_heads=2, bos_token_id=0,
                                                                         eos_token_id=0))
    with pytest.raises(ConversionError, match="converts GPT-2 and Llama models, not 'mistral'"):
        from_hf(mistral)
    from scratchformer.config import ModelConfig

    with pytest.raises(ConversionError, match="a GPT-2 needs positions=learned, this model has sinusoidal"):
        to_hf(GPT(ModelConfig(vocab_size=50, context=8, n_layers=1, d_model=32, n_heads=2, d_ff=64)))


def test_to_hf_says_that_transformers_has_no_document_mask():
    import dataclasses

    config = dataclasses.replace(GPT2, vocab_size=50, context=8, n_layers=1, d_model=32, n_heads=2, d_ff=64, document_token=49)
    with pytest.warns(UserWarning, match="trained with a document mask .* transformers' model has none"):
        to_hf(GPT(config))


def test_the_gpt2_preset_is_gpt2_small():
    with torch.device("meta"):
        ours = GPT(GPT2)
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) == 124_439_808


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random-weight GPT-2 with GPT-2's vocabulary, saved as transformers saves a downloaded one."""
    folder = tmp_path_factory.mktemp("gpt2-random")
    random_gpt2(vocab=50257, context=64, d_model=64, heads=2).save_pretrained(folder)
    return folder


def test_eval_hf_reports_the_loss_transformers_computes(gpt2_folder, small_text, capsys):
    assert cli.main(["eval", "--hf", str(gpt2_folder), "--data", str(small_text), "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    loss, word_ppl = float(line.split("loss ")[1].split(",")[0]), float(line.split(", ")[-1].split(" per word")[0])
    # The same windows through transformers' own GPT-2: side by side, each overlapping the last by one token.
    split = data.load_corpus(str(small_text))["eval"]
    tokens = torch.from_numpy(data.tokenize(split, BPETokenizer.from_gpt2()).astype(np.int64))
    hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder).eval()
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 64):
            window = tokens[start : start + 65][None]
            logits = hf(window[:, :-1]).logits
            nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    assert loss == pytest.approx(nll / (len(tokens) - 1), abs=1e-4)
    assert word_ppl == pytest.approx(math.exp(nll / split.words), rel=1e-3)
    assert cli.main(["eval", "--hf", str(gpt2_folder), "--data", str(small_text), "--device", "cpu", "--stride", "16"]) == 0
    strided = float(capsys.readouterr().out.split("loss ")[1].split(",")[0])
    assert strided != pytest.approx(loss, abs=1e-4)  # more context per token: another number


def test_eval_hf_without_network_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), SCRATCHFORMER_DEBUG="")
    result = subprocess.run([sys.executable, "-m", "scratchformer.cli", "eval", "--hf", "gpt2", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("scratchformer eval: error: --hf gpt2: cannot load it (")
    assert "the first time needs network" in lines[0]


def test_train_init_from_fine_tunes_the_pretrained_weights(gpt2_folder, small_text, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--init-from", str(gpt2_folder), "--data", str(small_text), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--context", "32", "--lr-scale", "1e-9", "--eval-every", "2", "--sample-tokens", "0",
            "--no-progress", "--device", "cpu"]
    assert cli.main(args) == 0
    assert "model.safetensors" in capsys.readouterr().out
    payload = load_checkpoint(out)
    assert payload["tokenizer_kind"] == "gpt2" and payload["model_config"]["context"] == 32
    pretrained = from_hf(transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)).state_dict()
    for name, weight in payload["model"].items():  # a learning rate of ~1e-12: the pretrained weights, barely moved
        expected = pretrained[name][:32] if name == "position_embedding.weight" else pretrained[name]
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-8)
    # The safetensors beside the checkpoint hold the same model, and eval reads either.
    from_weights, _ = model_from_checkpoint(load_checkpoint(out / "model.safetensors"))
    assert all(torch.equal(v, payload["model"][k]) for k, v in from_weights.state_dict().items())
    lines = []
    for checkpoint in (out, out / "model.safetensors"):
        assert cli.main(["eval", "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1] and "(step 2)" in lines[0]
    # --resume continues it like any run.
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "3", "--sample-tokens", "0", "--no-progress", "--device", "cpu"]) == 0
    assert load_checkpoint(out)["step"] == 3


def test_generate_from_a_transformers_folder_and_the_hint_when_it_is_given_as_a_checkpoint(gpt2_folder, capsys):
    assert cli.main(["generate", "--hf", str(gpt2_folder), "--prompt", "The", "--max-new-tokens", "4", "--seed", "1",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert cli.main(["eval", "--checkpoint", str(gpt2_folder), "--device", "cpu"]) == 1
    assert "no checkpoint there (a Hugging Face model folder: give it with --hf)" in capsys.readouterr().err
