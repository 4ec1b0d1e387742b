"""The fused backend's Python path (backend choice, reshapes, the autograd nodes, torch.compile's
tracing), on any machine: the CUDA kernels are replaced, for CPU tensors, by stand-ins that
compute the same contract in plain PyTorch, written here from the formulas. Gradients through
`backend="fused"` must then equal the reference backend's autograd; the kernels' own numerics
are tested elsewhere (emulator, `cuda` tests)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scratchformer
from scratchformer import _extensions, ops
from scratchformer.ops import backend

pytestmark = pytest.mark.skipif(_extensions.kernels is None, reason="the kernels library did not load")


def ln_fwd(x, weight, bias, residual, eps):
    h = x + residual if residual is not None else x
    hf = h.float()
    mean = hf.mean(-1)
    rstd = (hf.var(-1, unbiased=False) + eps).rsqrt()
    y = (hf - mean[:, None]) * rstd[:, None] * weight.float() + bias.float()
    return y.to(x.dtype), (h if residual is not None else x.new_empty(0, x.shape[1])), mean, rstd


def ln_bwd(dy, x, weight, mean, rstd, grad_h):
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    g = dy.float() * weight.float()
    dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_h is not None:
        dx = dx + grad_h.float()
    return dx.to(x.dtype), (dy.float() * xhat).sum(0).to(weight.dtype), dy.float().sum(0).to(weight.dtype)


def rms_fwd(x, weight, residual, eps):
    h = x + residual if residual is not None else x
    hf = h.float()
    rstd = ((hf * hf).mean(-1) + eps).rsqrt()
    return (hf * rstd[:, None] * weight.float()).to(x.dtype), (h if residual is not None else x.new_empty(0, x.shape[1])), rstd


def rms_bwd(dy, x, weight, rstd, grad_h):
    xhat = x.float() * rstd[:, None]
    g = dy.float() * weight.float()
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_h is not None:
        dx = dx + grad_h.float()
    return dx.to(x.dtype), (dy.float() * xhat).sum(0).to(weight.dtype)


def ce_chunk(logits, targets, row_scale, scale, ignore_index, label_smoothing, softcap, grad):
    z = logits.float()
    capped = softcap * torch.tanh(z / softcap) if softcap else z
    log_probs = torch.log_softmax(capped, dim=1)
    counted = targets != ignore_index
    picked = log_probs.gather(1, torch.where(counted, targets, 0)[:, None])[:, 0]
    loss = torch.where(counted, -(1 - label_smoothing) * picked - label_smoothing * log_probs.mean(1), 0.0)
    if grad:
        d = torch.exp(log_probs) - label_smoothing / z.shape[1]
        d.scatter_add_(1, torch.where(counted, targets, 0)[:, None], torch.full((z.shape[0], 1), label_smoothing - 1.0))
        if softcap:
            d = d * (1 - (capped / softcap) ** 2)
        weight = torch.where(counted, (row_scale if row_scale is not None else torch.ones_like(loss)) * scale, 0.0)
        logits.copy_(d * weight[:, None])
    return loss


def _scores(q, k, scale, first_key, softcap):
    """The kernels' contract (kernels.h): scores capped by softcap, query i seeing keys first_key[b, i]
    .. its diagonal (-inf elsewhere); also the cap's derivative."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, 1).float()
    s = q.float() @ kk.transpose(-1, -2) * scale
    slope = torch.ones_like(s)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
        slope = 1 - (s / softcap) ** 2
    t_q, t_k = q.shape[2], k.shape[2]
    s = s.masked_fill(torch.ones(t_q, t_k, dtype=torch.bool).triu(t_k - t_q + 1), -math.inf)
    if first_key is not None:
        s = s.masked_fill(torch.arange(t_k) < first_key[:, None, :, None], -math.inf)
    return s, slope, group


def attn_fwd(q, k, v, first_key, sinks, softcap, scale):
    s, _, group = _scores(q, k, scale, first_key, softcap)
    with_sinks = s if sinks is None else torch.cat([s, sinks[None, :, None, None].expand(*s.shape[:3], 1)], -1)
    lse = torch.logsumexp(with_sinks, -1)  # the sinks in the denominator
    return (torch.exp(s - lse[..., None]) @ v.repeat_interleave(group, 1).float()).to(q.dtype), lse


def attn_bwd(dout, q, k, v, out, lse, dlse, first_key, softcap, scale):
    s, slope, group = _scores(q, k, scale, first_key, softcap)
    p = torch.exp(s - lse[..., None])  # the forward's lse: sinks included
    vv, kk = v.repeat_interleave(group, 1).float(), k.repeat_interleave(group, 1).float()
    do = dout.float()
    dp = do @ vv.transpose(-1, -2)
    ds = p * (dp - (do * out.float()).sum(-1, keepdim=True))
    if dlse is not None:
        ds = ds + p * dlse[..., None]  # d lse / d s = softmax
    ds = ds * slope
    dq = ds @ kk * scale
    dk = (ds.transpose(-1, -2) @ q.float() * scale).unflatten(1, (k.shape[1], group)).sum(2)
    dv = (p.transpose(-1, -2) @ do).unflatten(1, (k.shape[1], group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@pytest.fixture
def stand_ins(monkeypatch):
    """The seven ops on CPU tensors run the formulas above, and `fused` is allowed on the CPU."""
    monkeypatch.setattr(backend, "_gpu_reason", lambda tensors: None)
    with torch.library._scoped_library("scratchformer", "IMPL") as lib:
        for name, fn in (("layer_norm_fwd", ln_fwd), ("layer_norm_bwd", ln_bwd), ("rms_norm_fwd", rms_fwd),
                         ("rms_norm_bwd", rms_bwd), ("attention_fwd", attn_fwd), ("attention_bwd", attn_bwd),
                         ("cross_entropy_chunk", ce_chunk)):
            lib.impl(name, fn, "CPU", allow_override=True)
        yield


def grads(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape)).sum() for o in outputs)
    loss.backward()
    return [o.detach() for o in outputs] + [t.grad for t in leaves]


def assert_same(a, b, tol):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), f"output/grad {i}: {x} against {y}"
        if x is not None:
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol, msg=lambda m: f"output/grad {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 40), (2, 3, 40)])  # 2-D goes as it is, 3-D is flattened and back
def test_layer_norm_gradients_through_the_fused_node(stand_ins, dtype, shape):
    torch.manual_seed(0)
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w, b = torch.randn(shape[-1]), torch.randn(shape[-1])  # float32 weights with low-precision x
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for op in (lambda x, w, b, r, backend: ops.layer_norm(x, w, b, backend=backend),
               lambda x, w, b, r, backend: ops.add_layer_norm(x, r, w, b, backend=backend)):
        fused, reference = (grads(lambda *leaves: op(*leaves, backend=name), (x, w, b, r)) for name in ("fused", "reference"))
        assert_same(fused, reference, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 40), (2, 3, 40)])
def test_rms_norm_gradients_through_the_fused_node(stand_ins, dtype, shape):
    torch.manual_seed(0)
    x, r, w = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), torch.randn(shape[-1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for op in (lambda x, w, r, backend: ops.rms_norm(x, w, 1e-5, backend=backend),
               lambda x, w, r, backend: ops.add_rms_norm(x, r, w, 1e-5, backend=backend)):
        fused, reference = (grads(lambda *leaves: op(*leaves, backend=name), (x, w, r)) for name in ("fused", "reference"))
        assert_same(fused, reference, tol)
    with torch.no_grad():  # no autograd node: the op alone
        assert ops.rms_norm(x, w, backend="fused").grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_through_the_chunk_kernel(stand_ins, dtype, reduction, monkeypatch):
    # The chunked path hands each chunk to the kernel (here its stand-in): the row weights of each
    # reduction, the gradient in the logits' dtype, its sums into weight and bias.
    monkeypatch.setenv("SCRATCHFORMER_SELFCHECK", "0")  # the stand-in itself, not PyTorch's math after a check
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(37, 16, dtype=dtype), torch.randn(61, 16, dtype=dtype) * 0.3, torch.randn(61, dtype=dtype)
    targets = torch.randint(0, 61, (37,))
    targets[5] = -100
    tol = 1e-5 if dtype == torch.float32 else 3e-2

    def op(h, w, b, backend):
        return ops.linear_cross_entropy(h, w, targets, bias=b, label_smoothing=0.1, softcap=20.0, reduction=reduction,
                                        chunk_rows=8, backend=backend)
    fused, reference = (grads(lambda *leaves: op(*leaves, backend=name), (hidden, weight, bias)) for name in ("fused", "reference"))
    assert_same(fused, reference, tol)


def test_only_the_residual_output_of_add_layer_norm_gets_a_gradient(stand_ins):
    """Gradient reaching h alone (y unused), and y alone: both paths of the node."""
    x, r, w, b = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16), torch.randn(16)
    for keep in (0, 1):
        results = {}
        for name in ("fused", "reference"):
            leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            out = ops.add_layer_norm(leaves[0], leaves[1], leaves[2], leaves[3], backend=name)[keep]
            out.pow(2).sum().backward()
            results[name] = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
        assert_same(results["fused"], results["reference"], 1e-5)


@pytest.mark.parametrize("heads, kv_heads, t_q, t_k", [(4, 4, 9, 9), (4, 2, 5, 11), (4, 1, 1, 7)])
def test_attention_gradients_through_the_fused_node(stand_ins, heads, kv_heads, t_q, t_k):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, heads, t_q, 32), torch.randn(2, kv_heads, t_k, 32), torch.randn(2, kv_heads, t_k, 32)
    fused = grads(lambda q, k, v: ops.causal_attention(q, k, v, scale=0.2, backend="fused"), (q, k, v))
    reference = grads(lambda q, k, v: ops.causal_attention(q, k, v, scale=0.2, backend="reference"), (q, k, v))
    assert_same(fused, reference, 1e-5)


PATTERNS = {
    "packed documents": dict(document_ids=torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 2], [4, 4, 4, 4, 4, 4, 9, 9, 9]])),
    "an id used again": dict(document_ids=torch.tensor([[0, 0, 1, 1, 0, 0, 0, 1, 0], [3, 3, 3, 3, 3, 3, 3, 3, 3]])),
    "left padding": dict(document_ids=torch.tensor([[-1, -2, -3, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0]])),
    "window": dict(window=(2, 0)),
    "window and documents": dict(document_ids=torch.tensor([[0] * 4 + [1] * 5, [0] * 9]), window=(3, 0)),
    "softcap": dict(softcap=0.5),
    "sinks": dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
    "all": dict(document_ids=torch.tensor([[0] * 4 + [1] * 5, [0] * 9]), window=(3, 0), softcap=0.7,
                sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
}


@pytest.mark.parametrize("t_q", [9, 4, 1])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_reach_the_kernels_as_first_keys(stand_ins, pattern, t_q):
    """document_ids and window become each query's first key, softcap and sinks go as they are (the
    kernels' contract): the fused path, with stand-ins that apply that contract, equals the
    reference's own mask, outputs and gradients (the sinks' too), for every query count."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, t_q, 32), torch.randn(2, 2, 9, 32), torch.randn(2, 2, 9, 32)
    kw = dict(PATTERNS[pattern])
    sinks = kw.pop("sinks", None)
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)

    def run(backend):
        return lambda q, k, v, *sinks: ops.causal_attention(q, k, v, scale=0.2, backend=backend, sinks=(sinks or [None])[0], **kw)

    assert_same(grads(run("fused"), leaves), grads(run("reference"), leaves), 1e-5)


def test_the_log_sum_exp_output_is_differentiable(stand_ins):
    from scratchformer.ops import reference
    from scratchformer.ops.attention import FusedAttention

    q, k, v = torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)
    fused = grads(lambda q, k, v: FusedAttention.apply(q, k, v, None, None, 0.0, 0.3), (q, k, v))
    expected = grads(lambda q, k, v: reference.causal_attention(q, k, v, 0.3), (q, k, v))
    assert_same(fused, expected, 1e-5)


def test_compile_traces_the_fused_nodes_in_one_graph(stand_ins):
    """fullgraph: no graph break in the backend choice or the autograd nodes; AOTAutograd runs
    the ops' fake implementations, then the same forward and backward as eager."""
    torch.manual_seed(0)

    def block(x, r, w, b, q, k, v):
        y, h = ops.add_layer_norm(x * 2, r, w, b, backend="fused")
        a = ops.causal_attention(q * 2, k, v, backend="fused")
        return (torch.tanh(y) + h).sum() + a.tanh().sum()

    leaves = [torch.randn(8, 32), torch.randn(8, 32), torch.randn(32), torch.randn(32),
              torch.randn(1, 4, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)]
    compiled = grads(torch.compile(block, fullgraph=True, backend="aot_eager"), leaves)
    eager = grads(block, leaves)
    assert_same(compiled, eager, 1e-5)


def test_compile_traces_a_patterned_call_in_one_graph(stand_ins):
    """Document ids, a window, softcapping and sinks: the first keys are derived inside the graph
    (no cache while compiling), the sinks' gradient with the rest."""
    torch.manual_seed(0)
    docs = torch.tensor([[0] * 3 + [1] * 5])

    def attend(q, k, v, sinks):
        out = ops.causal_attention(q, k, v, document_ids=docs, window=(4, 0), softcap=0.8, sinks=sinks, backend="fused")
        return out.tanh().sum()

    leaves = [torch.randn(1, 4, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(4)]
    compiled = grads(torch.compile(attend, fullgraph=True, backend="aot_eager"), leaves)
    assert_same(compiled, grads(attend, leaves), 1e-5)


def test_without_gradients_the_ops_run_without_an_autograd_node(stand_ins):
    x, r, w, b = torch.randn(3, 5, 16), torch.randn(3, 5, 16), torch.randn(16), torch.randn(16)
    q, k, v = torch.randn(1, 4, 6, 32), torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)
    with torch.no_grad():
        y, h = ops.add_layer_norm(x, r, w, b, backend="fused")
        expected_y, expected_h = ops.add_layer_norm(x, r, w, b, backend="reference")
        out = ops.causal_attention(q, k, v, backend="fused")
        expected = ops.causal_attention(q, k, v, backend="reference")
    assert y.grad_fn is None and out.grad_fn is None
    assert_same([y, h, out, ops.layer_norm(x, w, b, backend="fused")],
                [expected_y, expected_h, expected, ops.layer_norm(x, w, b, backend="reference")], 1e-5)


def test_the_host_cost_benchmark_runs_anywhere(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_host.py"
    package_parent = Path(scratchformer.__file__).parent.parent  # the package these tests import, installed or in place
    subprocess.run([sys.executable, str(script), "--reps", "20", "--out", str(tmp_path)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(package_parent)})
    rows = [line.split("|")[1:-1] for line in (tmp_path / "bench_host.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[0].strip() for r in rows[1:]] == ["layer_norm 16x512"] * 2 + ["add_layer_norm 16x512"] * 2 + ["causal_attention 1x8x16x64"] * 2 + ["causal_attention 1x8x16x64, documents"] * 2
    for row in rows[1:]:
        ours, stubs, host, _ = (float(c) for c in row[2:])
        assert ours > 0 and stubs > 0 and host == pytest.approx(ours - stubs, abs=0.11)


@pytest.mark.parametrize("options", [{}, dict(window=(2, 0), softcap=0.7, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]))])
def test_varlen_runs_as_one_packed_kernel_call(stand_ins, monkeypatch, options):
    """Sequences with as many queries as keys go to the kernels in one call, each a document of its
    own (an empty one included): outputs and gradients equal the reference's sequence by sequence."""
    torch.manual_seed(0)
    q, k, v = torch.randn(13, 4, 32), torch.randn(13, 2, 32), torch.randn(13, 2, 32)
    cu = torch.tensor([0, 5, 6, 6, 13], dtype=torch.int32)
    calls = []
    kernel = torch.ops.scratchformer.attention_fwd
    monkeypatch.setattr(torch.ops.scratchformer, "attention_fwd", lambda *a: calls.append(a[0].shape) or kernel(*a))

    def run(backend):
        return lambda q, k, v: ops.varlen_attention(q, k, v, cu, cu, scale=0.2, backend=backend, **options)

    fused = grads(run("fused"), (q, k, v))
    assert calls == [(1, 4, 13, 32)]
    assert_same(fused, grads(run("reference"), (q, k, v)), 1e-5)


def test_a_forward_derives_the_first_keys_once_for_all_its_layers(stand_ins, monkeypatch):
    """The layers of a forward pass the same document ids (or the same window): their first keys are
    computed once, and again for new ids, ids changed in place or another window."""
    from scratchformer.ops import attention

    derived = []
    real = attention.first_keys
    monkeypatch.setattr(attention, "first_keys", lambda *a: derived.append(1) or real(*a))
    monkeypatch.setattr(attention, "_last_first_keys", None)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 32), torch.randn(2, 2, 9, 32), torch.randn(2, 2, 9, 32)
    docs = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    outs = [ops.causal_attention(q, k, v, document_ids=docs, backend="fused") for _ in range(4)]
    assert len(derived) == 1 and all(torch.equal(o, outs[0]) for o in outs)
    docs[1, 6:] = 1  # in place: another pattern
    changed = ops.causal_attention(q, k, v, document_ids=docs, backend="fused")
    assert len(derived) == 2
    torch.testing.assert_close(changed, ops.causal_attention(q, k, v, document_ids=docs, backend="reference"))
    ops.causal_attention(q, k, v, document_ids=docs.clone(), backend="fused")
    ops.causal_attention(q, k, v, document_ids=docs, window=(3, 0), backend="fused")
    assert len(derived) == 4
    windowed = [ops.causal_attention(q, k, v, window=(3, 0), backend="fused") for _ in range(3)]  # a window alone
    assert len(derived) == 5
    torch.testing.assert_close(windowed[-1], ops.causal_attention(q, k, v, window=(3, 0), backend="reference"))
    ops.causal_attention(q, k, v, window=(4, 0), backend="fused")
    assert len(derived) == 6


def test_document_ids_made_under_inference_mode(stand_ins):
    """Inference tensors keep no version counter: their first keys are derived each call, not cached."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    with torch.inference_mode():
        docs = torch.tensor([[0] * 4 + [1] * 5])
        out = ops.causal_attention(q, k, v, document_ids=docs, backend="fused")
    torch.testing.assert_close(out, ops.causal_attention(q, k, v, document_ids=docs.clone(), backend="reference"))


def test_first_keys_are_made_on_q_s_device():
    """A window alone has no tensor to take a device from: the kernels' first keys follow q."""
    from scratchformer.ops.attention import _kernel_first_keys

    q = torch.empty(2, 4, 5, 32, device="meta")
    first = _kernel_first_keys(q, 9, None, 3)
    assert first.device == q.device and first.dtype == torch.int32 and first.shape == (2, 5)
