"""hf.apply: one line puts a transformers model's attention, norms and loss on scratchformer's ops,
and the model computes what it computed before (logits, loss, every gradient)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import scratchformer.hf as sfhf  # noqa: E402


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=64, n_head=4, n_layer=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0))


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0))


def gemma2():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=64, final_logit_softcapping=5.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def results(model, ids, labels, num_items=None):
    """Logits without labels, the loss with them, and every parameter's gradient of that loss."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(ids).logits
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    loss = model(ids, labels=labels, **kwargs).loss
    loss.backward()
    return [logits, loss.detach()] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def assert_within_twice(ours, low, truth):
    for i, (o, l, t) in enumerate(zip(ours, low, truth)):
        t = t.double()
        err, err_low = (o.double() - t).abs().max().item(), (l.double() - t).abs().max().item()
        floor = 1e-5 * (1 + t.abs().max().item())
        assert err <= 2 * err_low + floor, f"output {i}: error {err:.3g} > 2 x the unpatched model's {err_low:.3g} + {floor:.2g}"


@pytest.mark.parametrize("build, expected", [
    (gpt2, {"attention": 2, "layer_norm": 5, "rms_norm": 0, "loss": 1}),
    (llama, {"attention": 2, "layer_norm": 0, "rms_norm": 5, "loss": 1}),
    (qwen2, {"attention": 2, "layer_norm": 0, "rms_norm": 5, "loss": 1}),
    (gemma2, {"attention": 2, "layer_norm": 0, "rms_norm": 9, "loss": 1}),  # four norms a layer, Gemma's 1 + weight
], ids=["gpt2", "llama", "qwen2", "gemma2"])
def test_apply_keeps_logits_loss_and_gradients(build, expected):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for p in model.parameters():  # not the norms' 0/1 init, so that their weights matter
            p.add_(torch.randn_like(p) * 0.05)
    truth_model = copy.deepcopy(model).double()
    patched = copy.deepcopy(model)
    assert sfhf.apply(patched) == expected
    sfhf.reset_stats()
    ids = torch.randint(0, 300, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt not scored
    for num_items in (None, torch.tensor(31)):  # the mean, and transformers' sum over the items of a whole batch
        truth = results(truth_model, ids, labels, num_items)
        assert_within_twice(results(patched, ids, labels, num_items), results(model, ids, labels, num_items), truth)
    assert patched(ids, labels=labels).logits is None  # the loss came without them
    assert sfhf.fallbacks() == {}  # Gemma 2's softcapping and sliding window included


def test_apply_puts_the_calls_on_our_ops():
    model = llama()
    sfhf.apply(model)
    sfhf.reset_stats()
    model(torch.randint(0, 300, (1, 10)))
    assert sfhf.stats() == {"scratchformer": 2, "sdpa": 0}
    assert all(isinstance(m, sfhf.HFRMSNorm) for name, m in model.named_modules() if name.endswith("norm"))
