"""First use of a fused kernel on a GPU: checked against the reference before it is trusted.

The kernels have been checked on a CPU emulator and in their compiled form, but a GPU, a driver
or a compiler can still disagree. So the `auto` backend runs each fused configuration (an op, a
dtype, a head size; per device) once per process on a small problem, forward and backward,
against the float64 reference, with the rule of the tests: the kernel's error at most twice that
of the reference in the same precision, plus a small floor. A configuration that fails is
reported once (a warning naming it and the errors) and runs on PyTorch's op from then on;
`backend="fused"` is never second-guessed. `SCRATCHFORMER_SELFCHECK=0` turns the check off.
`scratchformer selftest` runs every configuration and prints the table.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from . import backend, reference
from .attention import FUSED_DTYPES as ATTENTION_DTYPES
from .attention import FUSED_HEAD_DIMS, causal_attention
from .layer_norm import add_layer_norm, layer_norm
from .rms_norm import add_rms_norm, rms_norm


@dataclass
class Result:
    op: str
    config: str  # e.g. "bfloat16 D=64"
    device: str
    errors: dict[str, tuple[float, float]]  # output -> (kernel error, reference error), against float64
    passed: bool

    def worst(self) -> str:
        name, (err, ref) = max(self.errors.items(), key=lambda item: item[1][0] / (2 * item[1][1] + 1e-30))
        return f"{name}: {err:.2e} against the reference's {ref:.2e}"


def _within(got: torch.Tensor, low: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, bool]:
    truth = truth.double()
    err = (got.double() - truth).abs().max().item() if torch.isfinite(got).all() else float("inf")
    err_ref = (low.double() - truth).abs().max().item()
    floor = 1e-4 * (1 + truth.abs().max().item())
    return err, err_ref, err <= 2 * err_ref + floor


def _fused_attention(q, k, v, **pattern):
    return causal_attention(q, k, v, backend="fused", **pattern)


def _reference_attention(q, k, v, document_ids=None, window=None, softcap=None, sinks=None):
    return reference.causal_attention(q, k, v, None, document_ids, window and window[0], softcap, sinks)[0]


def _fused_layer_norm(x, w, b, r):
    if r is None:
        return layer_norm(x, w, b, backend="fused"), None
    return add_layer_norm(x, r, w, b, backend="fused")


def _fused_rms_norm(x, w, b, r):
    if r is None:
        return rms_norm(x, w, 1e-5, backend="fused"), None
    return add_rms_norm(x, r, w, 1e-5, backend="fused")


def _fused_cross_entropy(logits, targets, row_scale, label_smoothing, softcap):
    return torch.ops.scratchformer.cross_entropy_chunk(logits, targets, row_scale, 1.0, -100, label_smoothing, softcap, True)


# What runs as "the kernel" in a check; tests put a faulty one here to see it caught.
FUSED = {"causal_attention": _fused_attention, "layer_norm": _fused_layer_norm, "rms_norm": _fused_rms_norm,
         "cross_entropy_chunk": _fused_cross_entropy}


def _grads(outputs, weights, leaves):
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights) if o is not None)
    return list(torch.autograd.grad(loss, leaves))


def check_attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> Result:
    """Prefill (tensor-core or CUDA-core path) and decoding (split keys) shapes, GQA 2:1 and MHA
    (a large GPU splits either's backward over query tiles), lengths off the tile multiples, the MHA
    one long enough for tiles off the causal diagonal (the kernels' unmasked code), and one with packed
    documents, a window, softcapping and sinks (the PATTERN instances: skipped and masked tiles, the
    cap and its derivative, the sinks in the sum); output and dq, dk, dv."""
    g = torch.Generator().manual_seed(head_dim)
    errors, passed = {}, True
    docs = torch.tensor([[0] * 60 + [1] + [2] * 139, [0] * 130 + [1] * 70], device=device)
    pattern = dict(document_ids=docs, window=(90, 0), softcap=2.0, sinks=torch.linspace(-1.0, 2.0, 4, device=device))
    for t_q, t_k, kv_heads, pattern in ((70, 70, 2, {}), (3, 133, 2, {}), (200, 200, 4, {}), (200, 200, 2, pattern)):
        q, k, v = (torch.randn(2, h, t, head_dim, generator=g) for h, t in ((4, t_q), (kv_heads, t_k), (kv_heads, t_k)))
        dout = torch.randn(2, 4, t_q, head_dim, generator=g)
        runs = []
        for fn, cast in ((FUSED["causal_attention"], dtype), (_reference_attention, dtype),
                         (_reference_attention, torch.float64)):
            leaves = [t.to(device, cast).requires_grad_() for t in (q, k, v)]
            out = fn(*leaves, **pattern)
            runs.append([out.detach()] + _grads([out], [dout.to(device, torch.float64)], leaves))
        for name, got, low, truth in zip(("out", "dq", "dk", "dv"), *runs):
            err, err_ref, ok = _within(got, low, truth)
            key = f"{name} (Tq={t_q}, Tk={t_k}, {4 // kv_heads} queries per kv head{', documents, window, softcap, sinks' if pattern else ''})"
            errors[key] = (err, err_ref)
            passed &= ok
    config = f"{str(dtype).removeprefix('torch.')} D={head_dim}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0) and dtype != torch.float32 and head_dim in (64, 128):
        config += ", wgmma kernels"  # the prefill shapes take the Hopper kernels there (attention_hopper.cu)
    return Result("causal_attention", config, str(device), errors, passed)


def check_layer_norm(device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype, op: str = "layer_norm") -> Result:
    """Vectorised and element-wise rows, with and without the fused residual add; y, h and every
    gradient. `op` "rms_norm": RMSNorm on the same kernels (no bias)."""
    rms = op == "rms_norm"
    g = torch.Generator().manual_seed(7)
    errors, passed = {}, True
    for channels, residual in ((512, False), (67, True)):
        x, r = torch.randn(37, channels, generator=g), torch.randn(37, channels, generator=g)
        w, b = torch.randn(channels, generator=g) * 0.5 + 1, torch.randn(channels, generator=g)
        dy, dh = torch.randn(37, channels, generator=g), torch.randn(37, channels, generator=g)
        runs = []
        for cast, wcast, fused in ((dtype, weight_dtype, True), (dtype, weight_dtype, False), (torch.float64, torch.float64, False)):
            leaves = [x.to(device, cast), w.to(device, wcast)] + ([] if rms else [b.to(device, wcast)])
            leaves = [t.requires_grad_() for t in leaves + ([r.to(device, cast)] if residual else [])]
            rr = leaves[-1] if residual else None
            bias = None if rms else leaves[2]
            if fused:
                y, h = FUSED[op](leaves[0], leaves[1], bias, rr)
            else:
                h = leaves[0] + rr if residual else None
                normalized = h if residual else leaves[0]
                y = reference.rms_norm(normalized, leaves[1], 1e-5) if rms else reference.layer_norm(normalized, leaves[1], bias)[0]
            outputs = [y, h]
            runs.append([y.detach()] + _grads(outputs, [dy.to(device, torch.float64), dh.to(device, torch.float64)], leaves))
        names = ["y", "dx", "dweight"] + ([] if rms else ["dbias"]) + (["dresidual"] if residual else [])
        for name, got, low, truth in zip(names, *runs):
            err, err_ref, ok = _within(got, low, truth)
            errors[f"{name} (C={channels})"] = (err, err_ref)
            passed &= ok
    config = str(dtype).removeprefix("torch.") + (f", {str(weight_dtype).removeprefix('torch.')} weights" if weight_dtype != dtype else "")
    return Result(op, config, str(device), errors, passed)


def _cross_entropy_truth(logits, targets, row_scale, label_smoothing, softcap):
    """Loss per row and, in place of the logits, the gradient of sum(row_scale * loss): autograd of
    the formula, in the logits' precision (float32 for 16-bit ones) or float64."""
    z = logits.float().detach().requires_grad_() if logits.dtype != torch.float64 else logits.detach().requires_grad_()
    capped = softcap * torch.tanh(z / softcap) if softcap else z
    log_probs = torch.log_softmax(capped, dim=1)
    counted = targets != -100
    picked = log_probs.gather(1, torch.where(counted, targets, 0)[:, None])[:, 0]
    loss = torch.where(counted, -(1 - label_smoothing) * picked - label_smoothing * log_probs.mean(1), 0.0)
    (loss * row_scale.to(loss.dtype)).sum().backward()
    logits.copy_(z.grad)
    return loss.detach()


def check_cross_entropy(device: torch.device, dtype: torch.dtype) -> Result:
    """The loss chunk of linear_cross_entropy: rows of GPT-2's vocabulary (off the vector width) and
    of a narrow one, an ignored row, label smoothing and softcapping; the loss and the gradient."""
    g = torch.Generator().manual_seed(11)
    errors, passed = {}, True
    for vocab, label_smoothing, softcap in ((50257, 0.1, 0.0), (96, 0.0, 30.0)):
        logits, targets = torch.randn(5, vocab, generator=g) * 4, torch.randint(0, vocab, (5,), generator=g)
        targets[2] = -100
        row_scale = torch.rand(5, generator=g) + 0.5
        runs = []
        for cast, fn in ((dtype, FUSED["cross_entropy_chunk"]), (dtype, _cross_entropy_truth), (torch.float64, _cross_entropy_truth)):
            z = logits.to(device, cast, copy=True)  # each run overwrites its logits
            loss = fn(z, targets.to(device), row_scale.to(device), label_smoothing, softcap)
            runs.append([loss, z])
        for name, got, low, truth in zip(("loss", "gradient"), *runs):
            err, err_ref, ok = _within(got, low, truth)
            errors[f"{name} (V={vocab})"] = (err, err_ref)
            passed &= ok
    return Result("cross_entropy_chunk", str(dtype).removeprefix("torch."), str(device), errors, passed)


_verdicts: dict[tuple, bool] = {}


def enabled() -> bool:
    return os.environ.get("SCRATCHFORMER_SELFCHECK", "1") != "0"


@torch.compiler.assume_constant_result
def trusted(op: str, device_index: int, config: tuple) -> bool:
    """Whether `auto` may run the fused `op` in this configuration on cuda:device_index: the
    first call runs the check (once per process), later calls return its verdict."""
    key = (op, device_index, config)
    if key not in _verdicts:
        device = torch.device("cuda", device_index) if device_index >= 0 else torch.device("cpu")
        with torch.inference_mode(False), torch.enable_grad():  # also when called while generating
            result = run_check(op, device, config)
        _verdicts[key] = result.passed
        if not result.passed:
            warnings.warn(
                f"scratchformer: the fused {op} kernel ({result.config}) disagrees with the reference on "
                f"{device_name(device)}: {result.worst()}; PyTorch's op runs instead of it in this process. "
                "`scratchformer selftest` shows every configuration; please report it with that table.",
                RuntimeWarning, stacklevel=4)
    return _verdicts[key]


def first_use_check(op: str, device_index: int, config: tuple) -> bool:
    """What `auto` asks before running a fused configuration (installed in backend.py below).
    A configuration that passed answers from the table alone: this runs on every call."""
    return _verdicts.get((op, device_index, config), False) or not enabled() or trusted(op, device_index, config)


backend.set_first_use_check(first_use_check)


def run_check(op: str, device: torch.device, config: tuple) -> Result:
    if op == "causal_attention":
        return check_attention(device, *config)
    if op == "cross_entropy_chunk":
        return check_cross_entropy(device, *config)
    return check_layer_norm(device, *config, op=op)


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def all_checks(device: torch.device) -> list[Result]:
    """Every fused configuration `auto` can pick on a GPU, checked now (for `scratchformer selftest`)."""
    results = [check_attention(device, dtype, d) for dtype in ATTENTION_DTYPES for d in FUSED_HEAD_DIMS]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for weight_dtype in {dtype, torch.float32}:
            results += [check_layer_norm(device, dtype, weight_dtype, op) for op in ("layer_norm", "rms_norm")]
        results.append(check_cross_entropy(device, dtype))
    return results
