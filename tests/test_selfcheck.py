"""The first-use check that `auto` runs before trusting a fused kernel on a device: it passes a
correct kernel, catches a faulty one (injected here, as no GPU runs the real ones in CI), warns
once and falls back to PyTorch's op for that configuration only."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from scratchformer import cli, ops
from scratchformer.ops import backend, reference, selfcheck


def sdpa(q, k, v, **pattern):  # an independent correct "kernel": PyTorch's own attention
    return ops.causal_attention(q, k, v, backend="torch", **pattern)


def off_by_a_little(q, k, v, **pattern):  # a kernel with a subtle bug: the softmax scale slightly off
    return ops.causal_attention(q, k, v, scale=1.02 * q.shape[-1] ** -0.5, backend="torch", **pattern)


def pattern_blind(q, k, v, **pattern):  # a kernel that ignores document_ids and window
    return ops.causal_attention(q, k, v, backend="torch", softcap=pattern.get("softcap"), sinks=pattern.get("sinks"))


def cap_blind(q, k, v, **pattern):  # a kernel that ignores softcapping
    return ops.causal_attention(q, k, v, backend="torch", **{**pattern, "softcap": None})


def torch_layer_norm(x, w, b, r):  # PyTorch's LayerNorm in float32, as the kernel computes it
    h = x + r if r is not None else None
    y = F.layer_norm((h if r is not None else x).float(), x.shape[-1:], w.float(), b.float())
    return y.to(x.dtype), h


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setenv("SCRATCHFORMER_SELFCHECK", "1")
    return monkeypatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_correct_kernel_passes_and_a_faulty_one_is_caught(fresh, dtype):
    fresh.setitem(selfcheck.FUSED, "causal_attention", sdpa)
    good = selfcheck.check_attention(torch.device("cpu"), dtype, 32)
    assert good.passed, good.worst()
    cases = ((70, 70, 2, ""), (3, 133, 2, ""), (200, 200, 1, ""), (200, 200, 2, ", documents, window, softcap, sinks"))
    assert set(good.errors) == {f"{n} (Tq={tq}, Tk={tk}, {g} queries per kv head{p})"
                                for n in ("out", "dq", "dk", "dv") for tq, tk, g, p in cases}
    for faulty in (off_by_a_little, pattern_blind, cap_blind):
        fresh.setitem(selfcheck.FUSED, "causal_attention", faulty)
        bad = selfcheck.check_attention(torch.device("cpu"), dtype, 32)
        assert not bad.passed, faulty.__name__


def test_layer_norm_check(fresh):
    fresh.setitem(selfcheck.FUSED, "layer_norm", torch_layer_norm)
    for dtype, weight_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        result = selfcheck.check_layer_norm(torch.device("cpu"), dtype, weight_dtype)
        assert result.passed, result.worst()
    fresh.setitem(selfcheck.FUSED, "layer_norm", lambda x, w, b, r: torch_layer_norm(x, w * 1.01, b, r))
    assert not selfcheck.check_layer_norm(torch.device("cpu"), torch.bfloat16, torch.float32).passed


def torch_rms_norm(x, w, b, r):  # PyTorch's RMSNorm in float32, as the kernel computes it
    assert b is None
    h = x + r if r is not None else None
    return F.rms_norm((h if r is not None else x).float(), x.shape[-1:], w.float(), 1e-5).to(x.dtype), h


def test_rms_norm_check(fresh):
    fresh.setitem(selfcheck.FUSED, "rms_norm", torch_rms_norm)
    for dtype, weight_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        result = selfcheck.check_layer_norm(torch.device("cpu"), dtype, weight_dtype, "rms_norm")
        assert result.passed, result.worst()
        assert result.op == "rms_norm" and not any(name.startswith("dbias") for name in result.errors)
    fresh.setitem(selfcheck.FUSED, "rms_norm", lambda x, w, b, r: torch_rms_norm(x, w * 1.01, b, r))
    assert not selfcheck.check_layer_norm(torch.device("cpu"), torch.bfloat16, torch.float32, "rms_norm").passed


def test_cross_entropy_check(fresh):
    fresh.setitem(selfcheck.FUSED, "cross_entropy_chunk", selfcheck._cross_entropy_truth)  # a correct "kernel"
    for dtype in (torch.float32, torch.bfloat16):
        result = selfcheck.check_cross_entropy(torch.device("cpu"), dtype)
        assert result.passed, result.worst()
        assert set(result.errors) == {f"{n} (V={v})" for n in ("loss", "gradient") for v in (50257, 96)}

    def forgets_the_smoothing(logits, targets, row_scale, label_smoothing, softcap):
        return selfcheck._cross_entropy_truth(logits, targets, row_scale, 0.0, softcap)
    fresh.setitem(selfcheck.FUSED, "cross_entropy_chunk", forgets_the_smoothing)
    assert not selfcheck.check_cross_entropy(torch.device("cpu"), torch.bfloat16).passed


def test_auto_runs_pytorchs_op_for_a_configuration_that_failed_and_says_so_once(fresh):
    # Pretend the fused kernels could run here; the "kernel" is faulty for every configuration.
    fresh.setattr(backend, "_gpu_reason", lambda tensors: None)
    fresh.setitem(selfcheck.FUSED, "causal_attention", off_by_a_little)
    q, k, v = torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    with pytest.warns(RuntimeWarning, match=r"the fused causal_attention kernel \(float32 D=32\) disagrees with the reference on cpu"):
        out = ops.causal_attention(q, k, v)  # auto
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.causal_attention(q, k, v)  # the verdict is remembered: no second check, no second warning
    assert selfcheck._verdicts == {("causal_attention", -1, (torch.float32, 32)): False}


def test_a_configuration_that_passes_runs_fused_and_the_check_can_be_turned_off(fresh):
    fresh.setattr(backend, "_gpu_reason", lambda tensors: None)
    fresh.setitem(selfcheck.FUSED, "causal_attention", sdpa)
    q = torch.randn(1, 2, 9, 64)
    assert backend.choose("causal_attention", None, (q,), lambda: None, (torch.float32, 64)) == "fused"
    assert selfcheck._verdicts == {("causal_attention", -1, (torch.float32, 64)): True}
    fresh.setitem(selfcheck.FUSED, "causal_attention", off_by_a_little)
    fresh.setenv("SCRATCHFORMER_SELFCHECK", "0")
    assert backend.choose("causal_attention", None, (q,), lambda: None, (torch.float32, 32)) == "fused"
    assert backend.choose("causal_attention", "fused", (q,), lambda: None, (torch.float32, 32)) == "fused"
    assert len(selfcheck._verdicts) == 1  # neither the disabled check nor an explicit "fused" ran one


def test_selftest_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert cli.main(["selftest"]) == 0
    assert capsys.readouterr().out.startswith("scratchformer selftest: no CUDA GPU visible")


@pytest.mark.cuda
def test_selftest_on_the_gpu_passes_every_configuration(capsys):
    assert cli.main(["selftest"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "FAIL" not in out and "configurations match the reference" in out
