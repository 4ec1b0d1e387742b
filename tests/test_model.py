"""The GPT: shapes, causality, KV-cache equivalence, configuration errors, overfitting."""

import pytest
import torch
import torch.nn.functional as F

from scratchformer import ops
from scratchformer.config import ConfigError, ModelConfig
from scratchformer.kv_cache import KVCache
from scratchformer.model import GPT

VARIANTS = [
    (positions, kv_heads) for positions in ("sinusoidal", "rotary", "learned") for kv_heads in (4, 2, 1)
]


def small_model(positions="sinusoidal", n_kv_heads=None, tie=True, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, context=24, n_layers=2, d_model=32, n_heads=4, n_kv_heads=n_kv_heads,
                         d_ff=64, positions=positions, tie_embeddings=tie, **kw)
    return GPT(config).eval()


@pytest.mark.parametrize("positions, kv_heads", VARIANTS)
@pytest.mark.parametrize("tie", [True, False])
def test_output_shapes(positions, kv_heads, tie):
    model = small_model(positions, kv_heads, tie)
    idx = torch.randint(0, 97, (3, 11))
    assert model(idx).shape == (3, 11, 97)
    assert model.blocks[0].attention.key_value.weight.shape == (2 * kv_heads * 8, 32)  # K/V per kv head only
    assert (model.head is None) == tie


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("positions, kv_heads", VARIANTS)
def test_changing_a_token_never_changes_earlier_outputs(backend, positions, kv_heads):
    ops.set_backend(backend)
    model = small_model(positions, kv_heads)
    idx = torch.randint(0, 97, (2, 20))
    base = model(idx)
    for t in (0, 7, 19):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("positions, kv_heads", VARIANTS)
def test_kv_cache_gives_the_logits_of_full_recomputation(positions, kv_heads):
    model = small_model(positions, kv_heads)
    idx = torch.randint(0, 97, (2, 24))
    full = model(idx)
    cache = KVCache(model.config, batch_size=2)
    pieces = [model(idx[:, :9], cache)]  # a prompt, then one token at a time, then a chunk
    pieces += [model(idx[:, t : t + 1], cache) for t in range(9, 20)]
    pieces.append(model(idx[:, 20:], cache))
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_is_causal():
    """With the cache too, a later token never changes what earlier steps produced."""
    model = small_model("rotary", 2)
    idx = torch.randint(0, 97, (1, 12))
    cache_a, cache_b = KVCache(model.config, 1), KVCache(model.config, 1)
    first_a = model(idx[:, :6], cache_a)
    first_b = model(idx[:, :6], cache_b)
    other = idx[:, 6:].clone() + 1
    later_a, later_b = model(idx[:, 6:], cache_a), model(other % 97, cache_b)
    assert torch.equal(first_a, first_b)
    assert not torch.allclose(later_a, later_b)


EOT = 96


def packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, EOT, (2, 9), generator=g), torch.randint(0, EOT, (2, 12), generator=g)
    return torch.cat([a, torch.full((2, 1), EOT), b], dim=1)  # a document, then one starting at its token


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_document_mask_makes_a_packed_document_see_nothing_before_it(backend):
    # Rotary positions are relative: with the mask, the second document's logits are those of the
    # document alone; without it, the first document changes them.
    ops.set_backend(backend)
    idx = packed()
    masked = small_model("rotary", 2, document_token=EOT)
    plain = small_model("rotary", 2)
    assert masked.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(masked(idx)[:, 9:], masked(idx[:, 9:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked(idx)[:, :9], plain(idx)[:, :9], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(plain(idx)[:, 9:], plain(idx[:, 9:]), rtol=1e-3, atol=1e-3)


def test_a_document_mask_with_the_kv_cache_gives_the_logits_of_full_recomputation():
    model = small_model("sinusoidal", 2, document_token=EOT)
    idx = torch.cat([packed(), torch.full((2, 1), EOT), torch.randint(0, EOT, (2, 1))], dim=1)  # 24 tokens, 3 documents
    cache = KVCache(model.config, batch_size=2)
    pieces = [model(idx[:, :5], cache)] + [model(idx[:, t : t + 1], cache) for t in range(5, 21)] + [model(idx[:, 21:], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx), rtol=1e-5, atol=1e-5)


def test_context_overflow_is_an_error():
    model = small_model()
    with pytest.raises(ValueError, match="25 positions exceed the model's context of 24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    cache = KVCache(model.config, 1)
    model(torch.zeros(1, 20, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceed the model's context"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(d_model=30, n_heads=4), r"d_model \(30\) must be divisible by n_heads \(4\)"),
        (dict(n_heads=4, n_kv_heads=3), r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
        (dict(positions="alibi"), "positions must be one of sinusoidal, rotary, learned"),
        (dict(activation="silu"), "activation must be one of relu, gelu_tanh, swiglu"),
        (dict(norm_eps=0.0), "norm_eps must be > 0"),
        (dict(d_model=36, n_heads=4, positions="rotary"), "rotary positions need an even head size"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(n_layers=0), "n_layers must be at least 1"),
        (dict(document_token=50), r"document_token must be a token id in \[0, 50\)"),
    ],
)
def test_bad_configurations_are_rejected(changes, message):
    base = dict(vocab_size=50, context=8, n_layers=1, d_model=32, n_heads=4, d_ff=32)
    with pytest.raises(ConfigError, match=message):
        GPT(ModelConfig(**(base | changes)))


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_overfits_a_fixed_batch(positions):
    model = small_model(positions, 2).train()
    torch.manual_seed(1)
    batch = torch.randint(0, 97, (4, 17))
    x, y = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(x, targets=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05  # from ln(97) = 4.6 at the start


@pytest.mark.parametrize("tie", [True, False])
def test_the_loss_from_targets_is_the_cross_entropy_of_the_logits(tie):
    """forward(idx, targets) never holds the logits, and gives what they would: loss, per-token
    losses and the gradients of every parameter."""
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 97, (3, 24)), torch.randint(0, 97, (3, 24))
    results = {}
    for how in ("targets", "logits"):
        model = small_model(tie=tie)
        if how == "targets":
            loss, per_token = model(idx, targets=targets, label_smoothing=0.1), model(idx, targets=targets, reduction="none")
        else:
            logits = model(idx).flatten(0, 1)
            loss = F.cross_entropy(logits, targets.flatten(), label_smoothing=0.1)
            per_token = F.cross_entropy(logits, targets.flatten(), reduction="none").view(3, 24)
        loss.backward()
        results[how] = [loss.detach(), per_token.detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(results["targets"], results["logits"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="targets must have idx's shape"):
        small_model()(idx, targets=targets[:, :5])
