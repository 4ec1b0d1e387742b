"""Causal attention on a GPU: the fused kernels against the reference and PyTorch's SDPA.

    python benchmarks/bench_attention.py [--out DIR] [--reps 10]

Training shapes: bf16, causal, head_dim 64 and 128 with 2048 // head_dim heads, T from 256 to 8192
with batch * T = 16384 tokens, and the model's own shape (B=64, H=8, T=256, D=64). For each, the
median time of forward and of forward+backward over CUDA-event-timed reps (L2 flushed before
each), TFLOP/s (4*B*H*T*T*D/2 for the causal forward, 2.5x that for the backward), the peak
memory each implementation allocates, and the fused kernels' speedups over
F.scaled_dot_product_attention with its flash backend, with cuDNN where present, and over the
reference (run up to T = 2048; beyond that its T x T scores take too much memory). On an H100
"fused" runs the wgmma forward (attention_hopper.cu); the "mma.sync" column is the same op with
SCRATCHFORMER_WGMMA=0, the kernels every other GPU runs.

Decoding: one query per sequence against a KV cache of 256..32768 positions (H=16, D=128), batch
1 and 32: tokens per second of one attention call, fused (split-key kernel) against SDPA on the
same cache. Writes DIR/bench_attention.md and DIR/bench_attention.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_timing import l2_flush_buffer, timed
from scratchformer import ops

TOKENS = 16384
LENGTHS = [256, 512, 1024, 2048, 4096, 8192]
REFERENCE_MAX_T = 2048
CACHES = [256, 1024, 4096, 16384, 32768]


def peak_mib(fn) -> float:
    """Memory fn() allocates at its peak beyond what exists before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def sdpa(backend: SDPBackend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def available(fn, q, k, v) -> bool:
    try:
        fn(q, k, v)
        return True
    except RuntimeError:
        return False


def fused_mma_sync(q, k, v):
    """The fused op with the Hopper kernel switched off (what runs on an A100)."""
    os.environ["SCRATCHFORMER_WGMMA"] = "0"
    try:
        return ops.causal_attention(q, k, v, backend="fused")
    finally:
        del os.environ["SCRATCHFORMER_WGMMA"]


def training_rows(reps, flush, plot):
    hopper = torch.cuda.get_device_capability() == (9, 0)
    impls = {
        "fused": lambda q, k, v: ops.causal_attention(q, k, v, backend="fused"),
        **({"mma.sync": fused_mma_sync} if hopper else {}),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "reference": lambda q, k, v: ops.causal_attention(q, k, v, backend="reference"),
    }
    shapes = [(TOKENS // t, 2048 // d, t, d) for d in (64, 128) for t in LENGTHS] + [(64, 8, 256, 64)]
    rows = []
    for batch, heads, t, d in shapes:
        q, k, v = (torch.randn(batch, heads, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        flops_fwd = 4 * batch * heads * t * t * d / 2
        names = [n for n, f in impls.items() if (n != "reference" or t <= REFERENCE_MAX_T) and available(f, q, k, v)]
        with torch.no_grad():
            diff = (impls["fused"](q, k, v).float() - impls["flash"](q, k, v).float()).abs().max().item()
        for pass_name, flops in (("forward", flops_fwd), ("forward+backward", 3.5 * flops_fwd)):
            ms, mem = {}, {}
            for name in names:
                fn = impls[name]
                if pass_name == "forward":
                    with torch.no_grad():
                        ms[name] = timed(lambda: fn(q, k, v), reps, flush)
                        mem[name] = peak_mib(lambda: fn(q, k, v))
                else:
                    step = lambda: torch.autograd.backward(fn(q, k, v), dout)  # noqa: E731
                    ms[name] = timed(step, reps, flush)
                    mem[name] = peak_mib(step)
                    q.grad = k.grad = v.grad = None
            tflops = {n: flops / ms[n] / 1e9 for n in names}
            ratio = lambda n: f"{ms[n] / ms['fused']:.2f}x" if n in ms else "—"  # noqa: E731
            cell = lambda n: f"{tflops[n]:.0f}" if n in ms else "—"  # noqa: E731
            memory = lambda n: f"{mem[n]:.0f}" if n in mem else "—"  # noqa: E731
            rows.append(
                f"| {batch}x{heads}x{t}x{d} | {pass_name} | {ms['fused']:.3f} | {cell('fused')} | {cell('mma.sync')} | {cell('flash')} | "
                f"{cell('cudnn')} | {ratio('flash')} | {ratio('cudnn')} | {ratio('reference')} | "
                f"{memory('fused')} | {memory('reference')} | {diff:.1e} |"
            )
            print(rows[-1], flush=True)
            if (batch, heads) != (64, 8):
                for name in names:
                    plot.setdefault((d, pass_name, name), []).append((t, tflops[name]))
        del q, k, v, dout
    return rows


def decode_rows(reps, flush, plot):
    heads, d = 16, 128
    rows = []
    for batch in (1, 32):
        for cache in CACHES:
            q = torch.randn(batch, heads, 1, d, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, heads, cache, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            with torch.no_grad():
                fused_ms = timed(lambda: ops.causal_attention(q, k, v, backend="fused"), reps, flush)
                # One query that sees the whole cache needs no mask.
                sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), reps, flush)
                diff = (ops.causal_attention(q, k, v, backend="fused").float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max().item()
            tok = lambda ms: batch / ms * 1e3  # noqa: E731
            rows.append(
                f"| {batch} | {cache} | {fused_ms * 1e3:.1f} | {tok(fused_ms):,.0f} | {sdpa_ms * 1e3:.1f} | "
                f"{tok(sdpa_ms):,.0f} | {sdpa_ms / fused_ms:.2f}x | {diff:.1e} |"
            )
            print(rows[-1], flush=True)
            plot.setdefault(("decode", batch), []).append((cache, tok(fused_ms), tok(sdpa_ms)))
            del q, k, v
    return rows


def save_plot(plot, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    training = {key: points for key, points in plot.items() if key[0] != "decode"}
    for d, ax in zip((64, 128), axes):
        for (dim, pass_name, name), points in sorted(training.items(), key=str):
            if dim != d:
                continue
            style = "-" if pass_name == "forward" else "--"
            ax.plot([p[0] for p in points], [p[1] for p in points], "o" + style, label=f"{name} {pass_name}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (batch x T = 16384)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"bf16 causal, head_dim {d}")
        ax.legend(fontsize=6)
    ax = axes[2]
    for key, points in plot.items():
        if key[0] == "decode":
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"fused, batch {key[1]}")
            ax.plot([p[0] for p in points], [p[2] for p in points], "x--", label=f"SDPA, batch {key[1]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cached positions")
    ax.set_ylabel("tokens/s (one attention call)")
    ax.set_title("decoding, H=16, D=128")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    flush = l2_flush_buffer()
    plot = {}
    train = training_rows(args.reps, flush, plot)
    decode = decode_rows(args.reps, flush, plot)
    table = "\n".join([
        f"Causal attention on {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, median of {args.reps} reps, L2 flushed.",
        "",
        "| B x H x T x D | pass | fused ms | fused TFLOP/s | mma.sync TFLOP/s | flash TFLOP/s | cuDNN TFLOP/s | vs flash | vs cuDNN | vs reference | fused MiB | reference MiB | max abs diff to flash |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *train,
        "",
        "Decoding (one query against the cache, H=16, D=128):",
        "",
        "| batch | cache | fused µs | fused tokens/s | SDPA µs | SDPA tokens/s | vs SDPA | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *decode,
    ])
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_attention.md").write_text(table + "\n")
        save_plot(plot, args.out / "bench_attention.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
