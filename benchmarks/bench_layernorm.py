"""LayerNorm on a GPU: the fused kernel against the reference and torch.nn.functional.layer_norm.

    python benchmarks/bench_layernorm.py [--out DIR]

For each shape (rows x C, from the model's 16384 x 512 up to 65536 x 4096), dtype (bf16, fp32)
and pass (forward, forward+backward): median time over CUDA-event-timed reps with the L2 cache
flushed before each, the bandwidth achieved (bytes each pass must move, each tensor counted once),
that bandwidth as a fraction of a device-to-device copy of the same bytes measured in the same
run, the fused kernel's speedup over each alternative, and the host's microseconds per call of the
fused op and of F.layer_norm (gpu_timing.host_us: beyond the kernels' time it is the op's cost;
`bench_host.py` breaks it down on any machine). Writes DIR/bench_layernorm.md and a
plot of GB/s against C (DIR/bench_layernorm.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_timing import host_us, l2_flush_buffer, timed
from scratchformer import ops

SHAPES = [(16384, 512), (16384, 1024), (65536, 768), (32768, 2048), (65536, 4096)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_layernorm needs a CUDA GPU", file=sys.stderr)
        return 2
    flush = l2_flush_buffer()
    rows_out, plot = [], {}
    for dtype in (torch.bfloat16, torch.float32):
        size = torch.finfo(dtype).bits // 8
        for rows, C in SHAPES:
            x = torch.randn(rows, C, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(C, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(C, device="cuda", dtype=dtype, requires_grad=True)
            dy = torch.randn(rows, C, device="cuda", dtype=dtype)
            n = rows * C
            # forward: read x, write y (+ weight, bias, mean, rstd); backward: read dy, x, weight,
            # mean, rstd, write dx, dweight, dbias.
            bytes_fwd = 2 * n * size + 2 * C * size + 8 * rows
            bytes_bwd = 3 * n * size + 3 * C * size + 8 * rows
            src = torch.empty(n * size, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            copy_ms = timed(lambda: dst.copy_(src), args.reps, flush)
            copy_gbs = 2 * n * size / copy_ms / 1e6
            impls = {
                "fused": lambda: ops.layer_norm(x, w, b, backend="fused"),
                "reference": lambda: ops.layer_norm(x, w, b, backend="reference"),
                "F.layer_norm": lambda: F.layer_norm(x, (C,), w, b),
            }
            for pass_name, nbytes in (("forward", bytes_fwd), ("forward+backward", bytes_fwd + bytes_bwd)):
                ms, host = {}, {}
                for name, fwd in impls.items():
                    call = fwd if pass_name == "forward" else (lambda fwd=fwd: torch.autograd.backward(fwd(), dy))
                    with torch.set_grad_enabled(pass_name != "forward"):
                        ms[name] = timed(call, args.reps, flush)
                        if name != "reference":
                            host[name] = host_us(call, args.reps)
                gbs = nbytes / ms["fused"] / 1e6
                rows_out.append(
                    f"| {str(dtype).split('.')[-1]} | {rows} x {C} | {pass_name} | {ms['fused']:.3f} | {gbs:.0f} | "
                    f"{gbs / copy_gbs:.0%} | {ms['F.layer_norm'] / ms['fused']:.2f}x | {ms['reference'] / ms['fused']:.2f}x | "
                    f"{host['fused']:.0f} | {host['F.layer_norm']:.0f} |"
                )
                plot.setdefault((str(dtype).split(".")[-1], pass_name), []).append((C, gbs, copy_gbs))
                print(rows_out[-1], flush=True)
            del x, w, b, dy, src, dst
    table = "\n".join([
        f"LayerNorm on {torch.cuda.get_device_name()}, torch {torch.__version__}; median of {args.reps} reps, L2 flushed.",
        "",
        "| dtype | rows x C | pass | fused ms | fused GB/s | of copy bandwidth | vs F.layer_norm | vs reference "
        "| fused host us per call | F.layer_norm host us per call |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows_out,
    ])
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_layernorm.md").write_text(table + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for (dtype, pass_name), points in plot.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"fused {dtype} {pass_name}")
        copy = sorted({(p[0], p[2]) for pts in plot.values() for p in pts})
        ax.plot([c for c, _ in copy], [g for _, g in copy], "k--", label="device copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("C")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / "bench_layernorm.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
