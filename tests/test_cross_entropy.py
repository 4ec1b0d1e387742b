"""linear_cross_entropy: every backend against the float64 formula, and the chunked path's memory."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scratchformer import ops


def make_inputs(n, d, vocab, dtype, ignored_every=5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(vocab, d, generator=g) * d**-0.5).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    if ignored_every:
        targets[::ignored_every] = -100
    return hidden, weight, b, targets


def run(backend, hidden, weight, bias, targets, cast=lambda t: t, reduction="mean", **kw):
    """The loss and the gradients of hidden, weight and bias (of loss * random row weights for "none")."""
    leaves = [cast(t).clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = ops.linear_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2], reduction=reduction, backend=backend, **kw)
    weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def assert_within_twice_the_reference(ours, low, truth, names=("loss", "d hidden", "d weight", "d bias")):
    for name, o, l, t in zip(names, ours, low, truth):
        assert torch.isfinite(o).all(), f"{name}: not finite"
        t = t.double()
        err, err_low = (o.double() - t).abs().max().item(), (l.double() - t).abs().max().item()
        floor = 1e-5 * (1 + t.abs().max().item())
        assert err <= 2 * err_low + floor, f"{name}: error {err:.3g} > 2 x the reference's {err_low:.3g} + {floor:.2g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_every_backend_against_float64(backend, label_smoothing, reduction, dtype):
    inputs = make_inputs(61, 24, 1009, dtype)  # 1009: not a multiple of anything, 61 rows: not of the chunk
    kw = dict(label_smoothing=label_smoothing, reduction=reduction, chunk_rows=16)
    truth = run("reference", *inputs, cast=torch.Tensor.double, **kw)
    low = run("reference", *inputs, **kw)
    assert_within_twice_the_reference(run(backend, *inputs, **kw), low, truth)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("vocab, softcap", [(50257, None), (1009, 30.0)])
def test_the_chunk_kernel_on_a_gpu_against_float64(dtype, reduction, vocab, softcap, monkeypatch):
    monkeypatch.setenv("SCRATCHFORMER_SELFCHECK", "0")  # this test is the check: the kernel itself runs
    hidden, weight, bias, targets = (t.cuda() if t is not None else None for t in make_inputs(61, 64, vocab, dtype))
    torch.library.opcheck(torch.ops.scratchformer.cross_entropy_chunk.default,
                          (hidden @ weight.T, targets, None, 1.0, -100, 0.1, 0.0, True))
    kw = dict(label_smoothing=0.1, softcap=softcap, reduction=reduction, chunk_rows=16)
    truth = run("reference", hidden, weight, bias, targets, cast=torch.Tensor.double, **kw)
    low = run("reference", hidden, weight, bias, targets, **kw)
    assert_within_twice_the_reference(run("fused", hidden, weight, bias, targets, **kw), low, truth)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_gpt2_s_vocabulary_in_chunks_that_do_not_divide_it(softcap):
    inputs = make_inputs(40, 16, 50257, torch.float32, bias=False)
    kw = dict(label_smoothing=0.1, softcap=softcap)
    truth = run("reference", *inputs, cast=torch.Tensor.double, **kw)
    for chunk_rows in (None, 7):  # the budget's chunk, and one that leaves a short last chunk
        assert_within_twice_the_reference(run("fused", *inputs, chunk_rows=chunk_rows, **kw), run("reference", *inputs, **kw), truth)


def test_softcap_against_float64_in_half_precision():
    inputs = make_inputs(33, 16, 300, torch.float16)
    kw = dict(softcap=2.0, chunk_rows=8, reduction="sum")
    truth = run("reference", *inputs, cast=torch.Tensor.double, **kw)
    for backend in ("fused", "torch"):
        assert_within_twice_the_reference(run(backend, *inputs, **kw), run("reference", *inputs, **kw), truth)


def test_the_formula_is_pytorch_s_cross_entropy():
    """The reference is the definition; it is checked once against F.cross_entropy itself."""
    hidden, weight, bias, targets = make_inputs(50, 8, 97, torch.float64)
    logits = hidden @ weight.T + bias
    for reduction in ("mean", "sum", "none"):
        expected = F.cross_entropy(logits, targets, label_smoothing=0.2, reduction=reduction)
        got = ops.reference.linear_cross_entropy(hidden, weight, targets, bias, 0.2, -100, reduction)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "torch", "reference"])
def test_all_rows_ignored(backend):
    hidden, weight, bias, targets = make_inputs(9, 8, 50, torch.float32)
    targets[:] = -100
    mean = run(backend, hidden, weight, bias, targets)
    assert torch.isnan(mean[0]) and all(torch.equal(g, torch.zeros_like(g)) for g in mean[1:])  # as F.cross_entropy
    total = run(backend, hidden, weight, bias, targets, reduction="sum")
    assert total[0].item() == 0 and all(torch.equal(g, torch.zeros_like(g)) for g in total[1:])


def test_without_gradients_the_fused_path_gives_the_same_loss():
    hidden, weight, bias, targets = make_inputs(30, 8, 77, torch.float32)
    with torch.no_grad():
        plain = ops.linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=4, backend="fused")
    hidden.requires_grad_()
    assert torch.equal(plain, ops.linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=4, backend="fused").detach())


def test_bad_input_is_a_clear_error():
    hidden, weight, _, targets = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match=r"hidden must be \[N, d\] and weight \[V, d\].*flatten"):
        ops.linear_cross_entropy(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="targets must be integer ids of shape"):
        ops.linear_cross_entropy(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="reduction must be one of mean, sum, none"):
        ops.linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ops.linear_cross_entropy(hidden, weight, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="share a floating-point dtype"):
        ops.linear_cross_entropy(hidden, weight.double(), targets)


PEAK = """
import resource, sys, torch
from scratchformer import ops
n, d, vocab = 4096, 64, 50257
hidden = torch.randn(n, d, requires_grad=True)
weight = (torch.randn(vocab, d) * 0.1).requires_grad_()
targets = torch.randint(0, vocab, (n,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = ops.linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1, backend=sys.argv[1])
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_the_chunked_path_peaks_under_a_quarter_of_the_logits():
    """Peak memory measured (the process's peak resident size, each path in its own process):
    forward and backward of the fused path at N 4096 and GPT-2's vocabulary stay under a quarter
    of the logits' 823 MB, where F.linear + F.cross_entropy hold them and their gradient."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    peak = {backend: int(subprocess.run([sys.executable, "-c", PEAK, backend], capture_output=True, text=True, check=True,
                                        env=env).stdout)
            for backend in ("fused", "torch")}
    logits = 4096 * 50257 * 4
    assert peak["fused"] < logits / 4, peak
    assert peak["torch"] > logits, peak  # the measure sees the materialised logits
