"""Host cost of the fused ops' Python path, on any machine: microseconds per call spent outside
the kernels.

The compiled ops are replaced, for CPU tensors, by stubs that only allocate their outputs (what
the real ops do besides launching the kernel), and `auto` is made to pick them. Each row times
one op through its public function (`ops.layer_norm`, ...), forward alone (no grad) or forward
and backward, and the stubs called as plain functions: the difference, "host us per call", is
what the dispatcher, autograd and our Python add to every call, on a GPU as here. PyTorch's own
op on the same tiny CPU tensors is shown for scale (its CPU kernels included). Tiny shapes, so
that the stubs cost next to nothing.

    python benchmarks/bench_host.py             # table on stdout
    python benchmarks/bench_host.py --out DIR   # and DIR/bench_host.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchformer import _extensions, ops
from scratchformer.ops import backend, selfcheck


# What the stubs stand in for: allocating the outputs, as the real ops do before their launch.
def _ln_fwd_stub(x, weight, bias, residual, eps):
    rows, channels = x.shape
    stats = torch.empty(rows, dtype=torch.float32)
    h = torch.empty((rows if residual is not None else 0, channels), dtype=x.dtype)
    return torch.empty_like(x), h, stats, torch.empty_like(stats)


def _ln_bwd_stub(dy, x, weight, mean, rstd, grad_h):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _attn_fwd_stub(q, k, v, first_key, sinks, softcap, scale):
    return torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32)


def _attn_bwd_stub(dout, q, k, v, out, lse, dlse, first_key, softcap, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _stub_kernels() -> torch.library.Library:
    """The four ops on CPU tensors become the stubs."""
    lib = torch.library.Library("scratchformer", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel": the point here
        warnings.simplefilter("ignore")
        for name, fn in (("layer_norm_fwd", _ln_fwd_stub), ("layer_norm_bwd", _ln_bwd_stub),
                         ("attention_fwd", _attn_fwd_stub), ("attention_bwd", _attn_bwd_stub)):
            lib.impl(name, fn, "CPU")
    return lib


def per_call_us(fn, reps: int) -> float:
    """Median over 5 batches of `reps` calls, in microseconds per call."""
    for _ in range(reps // 10):
        fn()
    batches = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        batches.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(batches)


def cases():
    """(op, pass, our op's call, the stubs' own cost, PyTorch's op) for each row."""
    x = torch.randn(16, 512, requires_grad=True)
    w, b = torch.randn(512, requires_grad=True), torch.randn(512, requires_grad=True)
    r = torch.randn(16, 512, requires_grad=True)
    dy = torch.randn(16, 512)
    mean = rstd = torch.empty(16)
    q, k, v = (torch.randn(1, 8, 16, 64, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 8, 16, 64)
    lse = torch.empty(1, 8, 16)
    docs = torch.tensor([[0] * 5 + [1] * 11])  # two packed documents: the op derives each query's first key

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def backward(fn, grads):
        return lambda: torch.autograd.backward(fn(), grads)

    def ln_stubs(residual, backward):
        def run():
            _ln_fwd_stub(x, w, b, residual, 1e-5)
            if backward:
                _ln_bwd_stub(dy, x, w, mean, rstd, residual)
        return run

    def attn_stubs(backward):
        def run():
            _attn_fwd_stub(q, k, v, None, None, 0.0, 0.125)
            if backward:
                _attn_bwd_stub(do, q, k, v, q, lse, None, None, 0.0, 0.125)
        return run

    def ln():
        return ops.layer_norm(x, w, b)

    def add_ln():
        return ops.add_layer_norm(x, r, w, b)

    def attn():
        return ops.causal_attention(q, k, v)

    def attn_docs():
        return ops.causal_attention(q, k, v, document_ids=docs)

    def torch_ln():
        return F.layer_norm(x, (512,), w, b)

    def torch_add_ln():
        h = x + r
        return F.layer_norm(h, (512,), w, b), h

    def torch_attn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def torch_attn_docs():  # SDPA with the equivalent boolean mask
        return ops.causal_attention(q, k, v, document_ids=docs, backend="torch")

    return [
        ("layer_norm 16x512", "forward", no_grad(ln), ln_stubs(None, False), no_grad(torch_ln)),
        ("layer_norm 16x512", "forward+backward", backward(ln, dy), ln_stubs(None, True), backward(torch_ln, dy)),
        ("add_layer_norm 16x512", "forward", no_grad(add_ln), ln_stubs(r, False), no_grad(torch_add_ln)),
        ("add_layer_norm 16x512", "forward+backward", backward(add_ln, (dy, dy)), ln_stubs(r, True),
         backward(torch_add_ln, (dy, dy))),
        ("causal_attention 1x8x16x64", "forward", no_grad(attn), attn_stubs(False), no_grad(torch_attn)),
        ("causal_attention 1x8x16x64", "forward+backward", backward(attn, do), attn_stubs(True), backward(torch_attn, do)),
        ("causal_attention 1x8x16x64, documents", "forward", no_grad(attn_docs), attn_stubs(False), no_grad(torch_attn_docs)),
        ("causal_attention 1x8x16x64, documents", "forward+backward", backward(attn_docs, do), attn_stubs(True),
         backward(torch_attn_docs, do)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2000, help="calls per timed batch (5 batches, median)")
    parser.add_argument("--out", type=Path, help="folder to write bench_host.md to")
    args = parser.parse_args()
    if _extensions.kernels is None:
        print(f"bench_host needs the kernels library: {_extensions.kernels_error}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    _lib = _stub_kernels()  # noqa: F841  (kept alive: dropping it unregisters the stubs)
    backend._gpu_reason = lambda tensors: None  # `auto` takes the (stubbed) fused ops on CPU tensors
    for op, config in (("layer_norm", (torch.float32, torch.float32)), ("causal_attention", (torch.float32, 64))):
        selfcheck._verdicts[(op, -1, config)] = True  # their first-use check passed: the lookup stays in the path
    lines = [f"Host cost per call on {platform.processor() or platform.machine()}, torch {torch.__version__}, one thread, "
             f"kernels stubbed; median of 5 x {args.reps} calls.", "",
             "| op | pass | our op, us | its stub kernels, us | host us per call | PyTorch's op on CPU, us (kernels included) |",
             "| --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for name, pass_name, ours, stubs, theirs in cases():
        t_ours, t_stubs, t_theirs = (per_call_us(fn, args.reps) for fn in (ours, stubs, theirs))
        lines.append(f"| {name} | {pass_name} | {t_ours:.1f} | {t_stubs:.1f} | {t_ours - t_stubs:.1f} | {t_theirs:.1f} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_host.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
