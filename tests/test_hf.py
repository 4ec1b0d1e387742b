"""The Hugging Face attention backend: transformers models on our ops give eager's logits and
gradients, fall back (counted) where our op cannot compute exactly, and train and generate.

Offline: the models are built from small configs with random weights."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
import scratchformer.hf as sfhf  # noqa: E402
from scratchformer import ops  # noqa: E402
from scratchformer.model import LayerNorm  # noqa: E402

VOCAB = 101


def gpt2_config(**kw):
    kw = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **kw}
    # head_dim 32: a size the fused kernel takes, so the `cuda` tests run it (no fallback)
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=128, n_layer=2, n_head=4,
                                   bos_token_id=0, eos_token_id=0, **kw)


def llama_config(kv_heads):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0)


CONFIGS = {"gpt2": gpt2_config, "llama-gqa": lambda: llama_config(2), "llama-mqa": lambda: llama_config(1)}


def build(config, implementation, state=None, dtype=torch.float32, device="cpu"):
    # Each model gets its own config: transformers records the implementation on the config object.
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)


@pytest.fixture(autouse=True)
def registered():
    sfhf.register()
    sfhf.reset_stats()


def logits_and_grads(model, idx, weights, **kw):
    logits = model(idx, **kw).logits
    (logits.float() * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def assert_within_twice_the_reference(ours, low, truth, name):
    assert torch.isfinite(ours).all(), f"{name}: not finite"
    truth = truth.double()
    err_ours = (ours.double() - truth).abs().max().item()
    err_low = (low.double() - truth).abs().max().item()
    floor = 1e-4 * (1 + truth.abs().max().item())
    assert err_ours <= 2 * err_low + floor, f"{name}: error {err_ours:.3g} > 2 x eager's {err_low:.3g} + {floor:.2g}"


def check_against_eager(arch, dtype, device, patch_norms=False):
    config = CONFIGS[arch]()
    eager64 = build(config, "eager", dtype=torch.float64, device=device)
    state = eager64.state_dict()
    eager = build(config, "eager", state, dtype, device)
    ours = build(config, "scratchformer", state, dtype, device)
    if patch_norms:
        assert sfhf.patch_layer_norm(ours) == 2 * config.n_layer + 1
    idx = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1)).to(device)
    weights = torch.randn(2, 37, VOCAB, generator=torch.Generator().manual_seed(2)).to(device)
    truth = logits_and_grads(eager64, idx, weights)
    low = logits_and_grads(eager, idx, weights)
    got = logits_and_grads(ours, idx, weights)
    assert_within_twice_the_reference(got[0], low[0], truth[0], "logits")
    for name in truth[1]:
        assert_within_twice_the_reference(got[1][name], low[1][name], truth[1][name], f"d {name}")
    n_layers = config.num_hidden_layers
    assert sfhf.stats() == {"scratchformer": n_layers, "sdpa": 0}  # every layer, once, on our op


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("arch", CONFIGS)
def test_logits_and_gradients_equal_eager(arch, backend):
    ops.set_backend(backend)
    check_against_eager(arch, torch.float32, "cpu")


def test_patched_layer_norms_keep_the_parameters_and_match_eager():
    ops.set_backend("reference")
    check_against_eager("gpt2", torch.float32, "cpu", patch_norms=True)
    model = build(gpt2_config(), "eager")
    before = {name: p for name, p in model.named_parameters()}
    assert sfhf.patch_layer_norm(model) == 5
    assert isinstance(model.transformer.ln_f, LayerNorm) and model.transformer.ln_f.eps == model.config.layer_norm_epsilon
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # the same tensors


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", CONFIGS)
def test_fused_kernels_in_hf_models_equal_eager(arch, dtype, monkeypatch):
    ops.set_backend("fused")  # an error rather than a fallback
    calls = []
    kernel = torch.ops.scratchformer.attention_fwd
    monkeypatch.setattr(torch.ops.scratchformer, "attention_fwd", lambda *a: calls.append(1) or kernel(*a))
    check_against_eager(arch, dtype, "cuda", patch_norms=arch == "gpt2")
    assert len(calls) == CONFIGS[arch]().num_hidden_layers  # our kernel ran in every layer


def mistral():
    return transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      sliding_window=6, bos_token_id=0, eos_token_id=0)


def qwen2():
    return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0)


def gemma2():  # logit softcapping, and a sliding window on every other layer
    return transformers.Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, head_dim=16,
                                     sliding_window=6, attn_logit_softcapping=5.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def gpt_oss():  # attention sinks, and a sliding window on every other layer
    return transformers.GptOssConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=64, vocab_size=VOCAB, head_dim=16, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=6, max_position_embeddings=64,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)


def qwen3():  # per-head q/k norms; a sliding window on every other layer
    return transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                    use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                    bos_token_id=0, eos_token_id=0)


def gemma3():  # local (sliding) and global layers, each with its own rotary base
    return transformers.Gemma3TextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, head_dim=16,
                                         sliding_window=6, sliding_window_pattern=2, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=0)


MODELS = {**CONFIGS, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3, "gemma2": gemma2, "gemma3": gemma3, "gpt-oss": gpt_oss}


def pair(arch):
    config = MODELS[arch]()
    eager = build(config, "eager")
    with torch.no_grad():  # gpt-oss's sinks away from their zero init, so that they matter
        for layer in getattr(getattr(eager, "model", None), "layers", []):
            if hasattr(layer.self_attn, "sinks"):
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, layer.self_attn.sinks.numel()))
    return config, eager, build(config, "scratchformer", eager.state_dict())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", MODELS)
def test_padded_batches_run_on_our_op_and_equal_eager(arch, side):
    config, eager, ours = pair(arch)
    idx = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(idx)
    real = [slice(None), slice(6, None) if side == "left" else slice(None, 14), slice(1, None) if side == "left" else slice(None, 19)]
    for row, keep in enumerate(real):
        mask[row] = 0
        mask[row, keep] = 1
    weights = torch.randn(3, 20, VOCAB, generator=torch.Generator().manual_seed(9)) * mask[..., None]  # real positions only
    got, got_grads = logits_and_grads(ours, idx, weights, attention_mask=mask)
    want, want_grads = logits_and_grads(eager, idx, weights, attention_mask=mask)
    for row, keep in enumerate(real):
        torch.testing.assert_close(got[row, keep], want[row, keep], rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6 * (1 + grad.abs().max().item()), msg=name)
    assert sfhf.fallbacks() == {}
    assert sfhf.stats()["scratchformer"] == config.num_hidden_layers


@pytest.mark.parametrize("arch", MODELS)
def test_packed_sequences_equal_each_sequence_alone(arch):
    # position_ids restarting mark packed sequences (DataCollatorWithFlattening): none sees another.
    # transformers reads them so only without a cache, as in training.
    config, eager, ours = pair(arch)
    lengths = [7, 1, 12]
    idx = torch.randint(1, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(10))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    by_positions = ours(idx, position_ids=position_ids, use_cache=False).logits
    # DataCollatorWithFlattening's flash-attention kwargs: the packing, whatever the model's masks read.
    by_offsets = ours(idx, position_ids=position_ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=12, max_length_k=12).logits
    assert sfhf.fallbacks() == {} and sfhf.stats()["scratchformer"] == 2 * config.num_hidden_layers
    start = 0
    for n in lengths:
        alone = eager(idx[:, start : start + n]).logits
        torch.testing.assert_close(by_offsets[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
        if arch != "gpt-oss":  # gpt-oss builds its masks without position_ids: packing needs the offsets
            torch.testing.assert_close(by_positions[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("arch", MODELS)
def test_generate_with_left_padded_prompts_equals_eager(arch):
    config, eager, ours = pair(arch)
    prompt = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # the second prompt is 5 tokens, left-padded
    prompt[1, :4] = 0
    kw = {"max_new_tokens": 10, "do_sample": False, "attention_mask": mask, "pad_token_id": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback on the way
        got = ours.generate(prompt, **kw)
    assert torch.equal(got, eager.generate(prompt, **kw))
    assert sfhf.fallbacks() == {}


def test_a_mask_of_another_pattern_falls_back_to_sdpa_counted():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 2
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    mask[5, 2] = False  # one key hidden from one query: no document or window gives that
    mask = mask[None, None].expand(2, 1, 9, 9)
    with pytest.warns(UserWarning, match="an attention mask other than padding, packed sequences or a sliding window"):
        got, _ = sfhf.attention_forward(module, q, k, v, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(got, want.transpose(1, 2))
    assert sfhf.stats() == {"scratchformer": 0, "sdpa": 1}


def test_attention_dropout_while_training_falls_back_and_evaluation_does_not():
    model = build(gpt2_config(attn_pdrop=0.1), "scratchformer").train()
    idx = torch.randint(0, VOCAB, (2, 16))
    with pytest.warns(UserWarning, match="attention dropout while training"):
        model(idx)
    assert sfhf.stats() == {"scratchformer": 0, "sdpa": 2}
    model.eval()(idx)
    assert sfhf.stats() == {"scratchformer": 2, "sdpa": 2}


@pytest.mark.parametrize("arch", CONFIGS)
def test_a_training_step_on_our_attention(arch):
    model = build(CONFIGS[arch](), "scratchformer").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(5):
        loss = model(idx, labels=idx).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    assert sfhf.fallbacks() == {}


@pytest.mark.parametrize("arch", CONFIGS)
def test_generate_with_the_kv_cache_equals_eager(arch):
    config = CONFIGS[arch]()
    eager = build(config, "eager")
    ours = build(config, "scratchformer", eager.state_dict())
    prompt = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    kw = {"max_new_tokens": 12, "do_sample": False, "attention_mask": torch.ones_like(prompt)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback on the way: prefill and decode on our op
        got = ours.generate(prompt, **kw)
    assert torch.equal(got, eager.generate(prompt, **kw))
    assert sfhf.stats() == {"scratchformer": 12 * config.num_hidden_layers, "sdpa": 0}


def test_softcapped_logits_are_computed_as_eager_does():
    # Gemma 2 caps its attention logits: our op's softcap, against the formula.
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16, dtype=torch.float64), torch.randn(2, 2, 9, 16, dtype=torch.float64), torch.randn(2, 2, 9, 16, dtype=torch.float64)
    module = torch.nn.Module().eval()
    got, _ = sfhf.attention_forward(module, q, k, v, None, scaling=0.3, softcap=2.0)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = torch.tanh(q @ kk.transpose(-1, -2) * 0.3 / 2.0) * 2.0
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(got, (scores.softmax(-1) @ vv).transpose(1, 2))
    assert sfhf.stats() == {"scratchformer": 1, "sdpa": 0}


def test_non_causal_calls_fall_back_except_a_single_query_which_sees_every_key_either_way():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 2
    with pytest.warns(UserWarning, match="non-causal attention"):
        got, _ = sfhf.attention_forward(module, q, k, v, None, is_causal=False)
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(got, full.transpose(1, 2))
    assert sfhf.stats() == {"scratchformer": 0, "sdpa": 1}
    got, _ = sfhf.attention_forward(module, q[:, :, -1:], k, v, None, is_causal=False)
    torch.testing.assert_close(got, full[:, :, -1:].transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert sfhf.stats() == {"scratchformer": 1, "sdpa": 1}


def _pair(config):
    eager = build(config, "eager")
    return eager, build(config, "scratchformer", eager.state_dict())


def test_attention_sinks_are_computed_as_eager_does():
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    config = transformers.GptOssConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=64, vocab_size=VOCAB, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=64, max_position_embeddings=64)
    eager, ours = _pair(config)
    with torch.no_grad():
        for model in (eager, ours):  # sinks away from their zero init, so that they matter
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, layer.self_attn.sinks.numel()))
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    got = ours(idx).logits
    assert sfhf.fallbacks() == {}
    want = eager(idx).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    sinks = [(a.self_attn.sinks.grad, b.self_attn.sinks.grad) for a, b in zip(eager.model.layers, ours.model.layers)]
    assert all(g is not None and g.abs().sum() > 0 for _, g in sinks)
    for want_grad, got_grad in sinks:
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_softcapping_with_left_padding_stays_finite_and_equals_eager():
    config = transformers.Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, head_dim=16,
                                       sliding_window=8)
    eager, ours = _pair(config)
    idx = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(idx)
    mask[1, :4] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = ours(idx, attention_mask=mask).logits
    want = eager(idx, attention_mask=mask).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 4:], want[1, 4:], rtol=1e-5, atol=1e-5)


def test_prefilling_a_static_cache_stays_on_our_op_and_equals_eager():
    config = llama_config(2)
    eager, ours = _pair(config)
    prompt = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    kw = {"max_new_tokens": 10, "do_sample": False, "attention_mask": torch.ones_like(prompt), "pad_token_id": 0,
          "cache_implementation": "static"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # decoding into a static cache masks its empty slots: SDPA
        got = ours.generate(prompt, **kw)
    assert torch.equal(got, eager.generate(prompt, **kw))
    # Transformers 5 prefills without a mask (on our op, keys cut to the prompt); 4.57 with one (SDPA).
    stats = sfhf.stats()
    # Decoding into the cache's last slot is bottom-right aligned: ours too.
    layers = config.num_hidden_layers
    assert stats["scratchformer"] in (layers, 2 * layers) and sum(stats.values()) == 10 * layers
