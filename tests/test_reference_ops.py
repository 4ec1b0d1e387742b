"""The from-scratch reference ops against PyTorch's own, in float64, outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F

from scratchformer.ops import reference

F64 = dict(dtype=torch.float64)


def sdpa_bottom_right(q, k, v, scale=None):
    """PyTorch's attention with the causal mask aligned bottom-right, K/V shared by head groups."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    mask = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def random_qkv(batch, n_heads, n_kv_heads, t_q, t_k, dim, **kw):
    q = torch.randn(batch, n_heads, t_q, dim, **kw, requires_grad=True)
    k = torch.randn(batch, n_kv_heads, t_k, dim, **kw, requires_grad=True)
    v = torch.randn(batch, n_kv_heads, t_k, dim, **kw, requires_grad=True)
    return q, k, v


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


ATTENTION_SHAPES = [
    # batch, Hq, Hkv, Tq, Tk, D
    (1, 8, 8, 1, 1, 64),
    (3, 8, 2, 17, 17, 64),
    (1, 8, 1, 33, 33, 32),
    (3, 8, 8, 1, 257, 16),  # one query against a cache: decoding
    (1, 8, 2, 17, 100, 64),  # Tq < Tk: a chunk of queries against a cache
    (2, 8, 1, 255, 256, 8),
    (1, 4, 4, 7, 7, 3),
]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_matches_torch_sdpa(shape):
    batch, n_heads, n_kv_heads, t_q, t_k, dim = shape
    q, k, v = random_qkv(batch, n_heads, n_kv_heads, t_q, t_k, dim, **F64)
    out, _ = reference.causal_attention(q, k, v)
    expected = sdpa_bottom_right(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    grad_out = torch.randn_like(out)
    for got, want, name in zip(grads(out, (q, k, v), grad_out), grads(expected, (q, k, v), grad_out), "qkv"):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
def test_attention_custom_scale(n_kv_heads):
    q, k, v = random_qkv(2, 8, n_kv_heads, 9, 20, 16, **F64)
    out, _ = reference.causal_attention(q, k, v, scale=0.37)
    torch.testing.assert_close(out, sdpa_bottom_right(q, k, v, scale=0.37), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_log_sum_exp(shape):
    batch, n_heads, n_kv_heads, t_q, t_k, dim = shape
    q, k, v = random_qkv(batch, n_heads, n_kv_heads, t_q, t_k, dim, **F64)
    _, lse = reference.causal_attention(q, k, v)
    # Independently: copy each kv head to its query heads and take logsumexp of the masked scores.
    group = n_heads // n_kv_heads
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * dim**-0.5
    mask = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)
    expected = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    assert lse.dtype == torch.float64 and lse.shape == (batch, n_heads, t_q)
    torch.testing.assert_close(lse, expected, rtol=1e-12, atol=1e-12)

    # The log-sum-exp carries gradients too (a kernel's backward relies on its definition).
    grad_lse = torch.randn_like(lse)
    got = grads(lse, (q, k), grad_lse)
    want = grads(expected, (q, k), grad_lse)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
def test_attention_cache_alignment(n_kv_heads):
    """The last Tq queries against all Tk keys equal the last Tq rows of full attention."""
    q, k, v = random_qkv(2, 8, n_kv_heads, 40, 40, 16, **F64)
    full, full_lse = reference.causal_attention(q, k, v)
    for t_q in (1, 5, 39):
        tail, tail_lse = reference.causal_attention(q[:, :, -t_q:], k, v)
        torch.testing.assert_close(tail, full[:, :, -t_q:], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(tail_lse, full_lse[:, :, -t_q:], rtol=1e-13, atol=1e-13)


def test_attention_is_causal():
    """Changing key/value j never changes the output of a query that cannot see j."""
    q, k, v = random_qkv(1, 4, 2, 12, 20, 8, **F64)
    out, _ = reference.causal_attention(q, k, v)
    j = 15  # visible to queries i with i + (20 - 12) >= 15, i.e. i >= 7
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, j] += 3.0
    v2[:, :, j] -= 2.0
    out2, _ = reference.causal_attention(q, k2, v2)
    assert torch.equal(out[:, :, :7], out2[:, :, :7])
    assert not torch.allclose(out[:, :, 7:], out2[:, :, 7:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_low_precision_dtypes(dtype):
    q, k, v = random_qkv(2, 8, 2, 17, 31, 64, dtype=dtype)
    out, lse = reference.causal_attention(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    truth, truth_lse = reference.causal_attention(q.double(), k.double(), v.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.double(), truth, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), truth_lse, rtol=tol, atol=tol)


LAYER_NORM_SHAPES = [(1, 1), (3, 7), (2, 5, 511), (4, 512), (2, 1024), (1, 5000), (6, 3, 64)]


@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES)
def test_layer_norm_matches_torch(shape):
    channels = shape[-1]
    x = (torch.randn(*shape, **F64) * 3 + 1.5).requires_grad_()
    weight = torch.randn(channels, **F64, requires_grad=True)
    bias = torch.randn(channels, **F64, requires_grad=True)
    y, mean, rstd = reference.layer_norm(x, weight, bias, eps=1e-5)
    expected = F.layer_norm(x, (channels,), weight, bias, eps=1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)

    var, want_mean = torch.var_mean(x.detach(), dim=-1, correction=0)
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rstd, (var + 1e-5) ** -0.5, rtol=1e-12, atol=1e-12)

    grad_out = torch.randn_like(y)
    for got, want, name in zip(
        grads(y, (x, weight, bias), grad_out), grads(expected, (x, weight, bias), grad_out), ("x", "weight", "bias")
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_norm_low_precision_keeps_fp32_statistics(dtype):
    x = torch.randn(64, 768).to(dtype) + 100  # a large mean: stats in low precision would lose it
    weight, bias = torch.randn(768).to(dtype), torch.randn(768).to(dtype)
    y, mean, rstd = reference.layer_norm(x, weight, bias)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    truth, _, _ = reference.layer_norm(x.double(), weight.double(), bias.double())
    # Within the output dtype's rounding (fp32: plus fp32 statistics of values near 100, ~1e-5);
    # statistics kept in bf16/fp16 miss by about 0.3 here.
    tol = {torch.float32: 2e-4, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(y.double(), truth, rtol=tol, atol=tol)
