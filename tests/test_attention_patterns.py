"""Attention patterns beyond plain causal: document masks, sliding windows, logit softcapping, sinks
and variable-length batches, on the reference and torch backends, against a query-by-query loop."""

import math

import pytest
import torch

from scratchformer import ops

BACKENDS = ["reference", "torch"]


def loop_attention(q, k, v, document_ids=None, left=None, softcap=None, sinks=None, scale=None):
    """One query at a time, from the definition: the keys it sees (a document is a run of equal ids:
    no change of id between key and query), their capped scores, a softmax with the sink in its
    denominator. Differentiable, float64."""
    batch, n_heads, t_q, dim = q.shape
    t_k, group = k.shape[2], n_heads // k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    rows = []
    for b in range(batch):
        for h in range(n_heads):
            for i in range(t_q):
                p = i + t_k - t_q
                keys = [j for j in range(t_k) if j <= p and (left is None or j >= p - left)
                        and (document_ids is None or all(document_ids[b, x] == document_ids[b, p] for x in range(j, p)))]
                scores = torch.stack([q[b, h, i] @ k[b, h // group, j] * scale for j in keys])
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                weights = torch.exp(scores)
                denominator = weights.sum() + (torch.exp(sinks[h]) if sinks is not None else 0)
                rows.append((weights[:, None] * v[b, h // group, keys]).sum(0) / denominator)
    return torch.stack(rows).view(batch, n_heads, t_q, dim)


def inputs(batch=2, heads=4, kv_heads=2, t=11, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, t, dim, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, t, dim, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, t, dim, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 5], [0, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3]])
# An id used again later starts another document: the runs [0 0] [1] [0 0 0] ... are six documents.
REUSED = torch.tensor([[0, 0, 1, 0, 0, 0, 1, 1, 0, 1, 1], [7, 7, 7, 7, 2, 2, 7, 7, 7, 7, 7]])
CASES = {
    "documents": dict(document_ids=DOCS),
    "documents, ids reused": dict(document_ids=REUSED),
    "window 3": dict(window=(3, 0)),
    "window 0": dict(window=(0, 0)),
    "softcap": dict(softcap=1.5),
    "sinks": dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)),
    "all": dict(document_ids=DOCS, window=(2, 0), softcap=2.0,
                sinks=torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("t_q, t", [(11, 11), (4, 11), (1, 11), (1, 1)])
def test_patterns_match_the_query_by_query_definition(backend, case, t_q, t):
    kw = {name: value[:, :t] if name == "document_ids" else value for name, value in CASES[case].items()}
    q, k, v = inputs(t=t)
    q_tail = q[:, :, -t_q:]
    out = ops.causal_attention(q_tail, k, v, backend=backend, **kw)
    window = kw.get("window")
    expected = loop_attention(q_tail, k, v, kw.get("document_ids"), window and window[0], kw.get("softcap"), kw.get("sinks"))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    leaves = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(expected, leaves, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_equal_each_document_alone(backend):
    q, k, v = inputs(batch=1, t=13, dtype=torch.float32)
    bounds = [0, 5, 6, 13]  # a one-token document in the middle
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 1, 7]))[None]
    packed = ops.causal_attention(q, k, v, document_ids=ids, backend=backend)
    for a, b in zip(bounds, bounds[1:]):
        alone = ops.causal_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], backend=backend)
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_as_wide_as_the_sequence_and_one_document_change_nothing(backend):
    q, k, v = inputs()
    plain = ops.causal_attention(q, k, v, backend=backend)
    wide = ops.causal_attention(q, k, v, window=(10, 0), document_ids=torch.zeros(2, 11, dtype=torch.long), backend=backend)
    torch.testing.assert_close(wide, plain, rtol=1e-12, atol=1e-12)
    narrow = ops.causal_attention(q, k, v, window=(9, 0), backend=backend)  # the last query loses key 0
    assert torch.equal(narrow[:, :, :10], plain[:, :, :10]) or torch.allclose(narrow[:, :, :10], plain[:, :, :10])
    assert not torch.allclose(narrow[:, :, 10], plain[:, :, 10])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_patterns_in_low_precision_follow_the_2x_rule(dtype):
    # PyTorch's op in `dtype` is at most twice as far from the float64 truth as the reference run
    # in `dtype`, plus a floor; the reference itself is within the dtype's usual tolerance.
    kw = CASES["all"]
    q, k, v = (t.detach() for t in inputs(dtype=dtype))
    sinks = kw["sinks"].detach().to(dtype)
    options = {**kw, "sinks": sinks}
    truth = loop_attention(q.double(), k.double(), v.double(), DOCS, 2, 2.0, sinks.double())
    reference = ops.causal_attention(q, k, v, backend="reference", **options).double()
    torch_op = ops.causal_attention(q, k, v, backend="torch", **options).double()
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert (torch_op - truth).abs().max() <= 2 * (reference - truth).abs().max() + floor
    torch.testing.assert_close(reference, truth, **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))


def varlen_inputs(lengths_q, lengths_k, heads=4, kv_heads=2, dim=8):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lengths_q), heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lengths_k), kv_heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lengths_k), kv_heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    cu = [torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32) for lengths in (lengths_q, lengths_k)]
    return q, k, v, *cu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths_q, lengths_k", [([5, 0, 1, 7], [5, 0, 1, 7]), ([1, 3, 2], [6, 3, 9])])
@pytest.mark.parametrize("case", ["plain", "window", "softcap+sinks"])
def test_varlen_matches_the_definition_per_sequence(backend, lengths_q, lengths_k, case):
    q, k, v, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k)
    sinks = torch.tensor([0.3, -0.2, 1.0, 0.0], dtype=torch.float64)
    kw = {"plain": {}, "window": dict(window=(2, 0)), "softcap+sinks": dict(softcap=3.0, sinks=sinks)}[case]
    out = ops.varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), backend=backend, **kw)
    assert out.shape == q.shape
    for s, (q0, q1, k0, k1) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])):
        if q1 == q0:
            continue
        one = [t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1])]
        expected = loop_attention(*one, left=kw.get("window", (None,))[0], softcap=kw.get("softcap"), sinks=kw.get("sinks"))
        torch.testing.assert_close(out[q0:q1], expected[0].transpose(0, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_gradients_equal_the_definitions(backend):
    q, k, v, cu_q, cu_k = varlen_inputs([3, 1, 4], [5, 1, 4])
    out = ops.varlen_attention(q, k, v, cu_q, cu_k, backend=backend)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    pieces = [loop_attention(*(t.transpose(0, 1)[None] for t in (q[a:b], k[c:d], v[c:d])))[0].transpose(0, 1)
              for a, b, c, d in ((0, 3, 0, 5), (3, 4, 5, 6), (4, 8, 6, 10))]
    want = torch.autograd.grad(torch.cat(pieces), (q, k, v), grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: ops.causal_attention(q, k, v, window=3), r"window must be \(left, 0\)"),
    (lambda q, k, v: ops.causal_attention(q, k, v, window=(3, 2)), "nothing to the right"),
    (lambda q, k, v: ops.causal_attention(q, k, v, window=(-1, 0)), "left >= 0"),
    (lambda q, k, v: ops.causal_attention(q, k, v, softcap=0.0), "softcap must be a positive number"),
    (lambda q, k, v: ops.causal_attention(q, k, v, softcap=math.inf), "softcap must be a positive number"),
    (lambda q, k, v: ops.causal_attention(q, k, v, sinks=torch.zeros(3)), r"sinks must be \[query heads\] = \[4\]"),
    (lambda q, k, v: ops.causal_attention(q, k, v, sinks=torch.zeros(4, dtype=torch.long)), "sinks must be a float tensor"),
    (lambda q, k, v: ops.causal_attention(q, k, v, document_ids=torch.zeros(2, 11)), "document_ids must be an integer"),
    (lambda q, k, v: ops.causal_attention(q, k, v, document_ids=torch.zeros(2, 10, dtype=torch.long)),
     r"document_ids must be \[batch, key length\] = \[2, 11\]"),
])
def test_bad_pattern_options_get_one_clear_error(call, message):
    q, k, v = (t.detach() for t in inputs())
    with pytest.raises((ValueError, TypeError), match=message):
        call(q, k, v)


@pytest.mark.parametrize("cu_q, cu_k, message", [
    ([0, 3, 7], [0, 7], "the same number of sequences"),
    ([0, 3, 6], [0, 3, 7], "rise from 0 to the 7 packed tokens"),
    ([0, 5, 7], [0, 3, 7], "sequence 0 has 5 queries and 3 keys"),
    ([1, 3, 7], [0, 3, 7], "rise from 0"),
])
def test_bad_varlen_offsets_get_one_clear_error(cu_q, cu_k, message):
    q, k, v, _, _ = varlen_inputs([3, 4], [3, 4])
    with pytest.raises(ValueError, match=message):
        ops.varlen_attention(q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32))
    with pytest.raises(ValueError, match="more than the max_seqlen given"):
        ops.varlen_attention(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32), 3, 4)
