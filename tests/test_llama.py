"""Llama's architecture: RMSNorm, SwiGLU, the llama preset, and Hugging Face Llama weights both ways."""

import pytest
import torch

from scratchformer import cli, ops
from scratchformer.config import ConfigError, ModelConfig, preset
from scratchformer.model import GPT
from scratchformer.records import load_checkpoint

SMALL = ["--n-layers", "1", "--d-model", "32", "--n-heads", "4", "--n-kv-heads", "2", "--d-ff", "48", "--context", "16",
         "--vocab-size", "300", "--batch-size", "4", "--warmup", "2", "--no-progress", "--device", "cpu", "--sample-tokens", "0"]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_against_float64(backend, dtype):
    torch.manual_seed(0)
    x, r, w = (torch.randn(5, 3, 48) * 3).to(dtype), torch.randn(5, 3, 48).to(dtype), torch.randn(48)
    truth = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    y = ops.rms_norm(*leaves, 1e-6, backend=backend)
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), truth, rtol=tol, atol=tol)
    y.float().pow(2).sum().backward()
    expected = [t.double().requires_grad_() for t in (x, w)]
    (expected[0] / (expected[0].pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * expected[1]).pow(2).sum().backward()
    for got, want in zip(leaves, expected):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=5 * tol, atol=5 * tol)
    y2, h = ops.add_rms_norm(x, r, w, 1e-6, backend=backend)
    assert torch.equal(h, x + r)
    torch.testing.assert_close(y2, ops.rms_norm(x + r, w, 1e-6, backend=backend))


def test_rms_norm_errors():
    with pytest.raises(ops.FusedUnavailableError, match="rms_norm: backend 'fused' cannot run: "):  # why depends on the build
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), backend="fused")
    with pytest.raises(ValueError, match=r"weight must be a floating-point tensor of shape \(8,\)"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(7))


def test_the_llama_preset_is_the_seed_model_s_size_with_llama_s_choices():
    llama, seed = preset("llama")[0], preset("seed")[0]
    assert (llama.norm, llama.activation, llama.positions, llama.bias) == ("rmsnorm", "swiglu", "rotary", False)
    assert llama.kv_heads < llama.n_heads  # grouped-query attention
    assert (llama.n_layers, llama.d_model, llama.context) == (seed.n_layers, seed.d_model, seed.context)
    sizes = GPT(llama).num_parameters(), GPT(seed).num_parameters()
    assert abs(sizes[0] / sizes[1] - 1) < 0.01, sizes
    model = GPT(llama)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="norm must be one of layernorm, rmsnorm"):
        ModelConfig(norm="batchnorm").validate()


def test_train_with_the_llama_preset(small_text, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "llama", "--data", str(small_text), "--out", str(out), "--steps", "4",
                     "--eval-every", "2", "--checkpoint-every", "2", *SMALL]) == 0
    payload = load_checkpoint(out)
    assert payload["model_config"]["norm"] == "rmsnorm" and payload["model_config"]["activation"] == "swiglu"
    assert payload["step"] == 4


transformers = pytest.importorskip("transformers")


def random_llama(tie=False, kv_heads=2, **kw):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, **kw)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # not the 0/1 init of the norms
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("tie, kv_heads", [(False, 2), (True, 1), (False, 4)])
def test_hf_llama_converted_gives_the_same_logits_and_round_trips_exactly(tie, kv_heads):
    from scratchformer.hf import from_hf, to_hf

    hf = random_llama(tie, kv_heads)
    ours = from_hf(hf).eval()
    assert ours.config.kv_heads == kv_heads and ours.config.tie_embeddings == tie
    idx = torch.randint(0, 300, (2, 40))
    expected = hf(idx).logits
    for backend in ("auto", "reference"):
        previous = ops.set_backend(backend)
        try:
            torch.testing.assert_close(ours(idx), expected, rtol=1e-5, atol=1e-5)
        finally:
            ops.set_backend(previous)
    back, original = to_hf(ours).state_dict(), hf.state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_what_the_llama_conversion_refuses():
    from scratchformer.hf import ConversionError, from_hf

    with pytest.raises(ConversionError, match="rope_theta=500000.0"):
        from_hf(random_llama(rope_theta=500000.0))
    with pytest.raises(ConversionError, match="attention_bias=True"):
        from_hf(random_llama(attention_bias=True))
    state = {k: v for k, v in random_llama().state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ConversionError, match="not a complete Llama state dict: layers.1.mlp.up_proj.weight is missing"):
        from_hf(state, config=random_llama().config)
