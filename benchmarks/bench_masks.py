"""Attention where PyTorch's fast paths stop, on a GPU: packed documents, a sliding window, logit
softcapping. `ops.causal_attention` with its options against SDPA with the equivalent boolean mask
(which leaves the flash backend) and against FlexAttention (compiled).

    python benchmarks/bench_masks.py [--out DIR] [--reps 10]

Cases (bf16, H=16, D=128): packed documents in rows of T=4096 (random lengths, mean 512), a
sliding window of 1024 at T=8192, softcap 50 at T=4096. Median ms of forward and of
forward+backward (CUDA events, L2 flushed), and the ratios. `ops` runs them on its kernels (on
Hopper, the wgmma ones); the table says which backend ran. Writes DIR/bench_masks.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_timing import l2_flush_buffer, timed
from scratchformer import ops
from scratchformer.ops.attention import _fused_reason
from scratchformer.ops.backend import choose

HEADS, DIM = 16, 128


def document_ids(batch: int, t: int, mean: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of packed documents: lengths uniform in [1, 2 * mean), the last cut at the row's end."""
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < t:
            lengths.append(int(torch.randint(1, 2 * mean, (1,), generator=generator)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:t])
    return torch.stack(rows).cuda()


def cases(generator: torch.Generator):
    """(name, batch, T, ops options, SDPA's boolean mask or None, FlexAttention's mask_mod, score_mod)."""
    docs = document_ids(4, 4096, 512, generator)

    def same_document(b, h, q, k):
        return (docs[b, q] == docs[b, k]) & (k <= q)

    def in_window(b, h, q, k):
        return (k <= q) & (k >= q - 1024)

    def causal(b, h, q, k):
        return k <= q

    def capped(score, b, h, q, k):
        return 50.0 * torch.tanh(score / 50.0)

    positions = torch.arange(8192, device="cuda")
    window = (positions[None, :] <= positions[:, None]) & (positions[None, :] >= positions[:, None] - 1024)
    document_mask = (docs[:, None, :, None] == docs[:, None, None, :]) & torch.ones(4096, 4096, dtype=torch.bool, device="cuda").tril()
    return [
        ("packed documents (mean 512)", 4, 4096, {"document_ids": docs}, document_mask, same_document, None),
        ("sliding window 1024", 2, 8192, {"window": (1024, 0)}, window, in_window, None),
        ("softcap 50", 4, 4096, {"softcap": 50.0}, None, causal, capped),
    ]


def run_case(name, batch, t, options, sdpa_mask, mask_mod, score_mod, reps, flush):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = (torch.randn(batch, HEADS, t, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    block_mask = create_block_mask(mask_mod, batch, None, t, t, device="cuda")
    flex = torch.compile(flex_attention)
    impls = {
        "ops": lambda: ops.causal_attention(q, k, v, **options),
        "sdpa+mask": (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)) if sdpa_mask is not None else None,
        "flex": lambda: flex(q, k, v, block_mask=block_mask, score_mod=score_mod),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the op says once that it runs on PyTorch's op: the table says it
        backend = choose("causal_attention", None, (q, k, v), lambda: _fused_reason(q), (q.dtype, DIM))
    rows = []
    for pass_name in ("forward", "forward+backward"):
        ms = {}
        for impl, fn in impls.items():
            if fn is None:
                continue
            try:
                if pass_name == "forward":
                    with torch.no_grad():
                        ms[impl] = timed(fn, reps, flush)
                else:
                    ms[impl] = timed(lambda: torch.autograd.backward(fn(), dout), reps, flush)
                    q.grad = k.grad = v.grad = None
            except (RuntimeError, torch.OutOfMemoryError) as e:  # one implementation failing loses no row
                print(f"{name}, {pass_name}, {impl}: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
        cell = lambda n: f"{ms[n]:.3f}" if n in ms else "—"  # noqa: E731
        ratio = lambda n: f"{ms[n] / ms['ops']:.2f}x" if n in ms and "ops" in ms else "—"  # noqa: E731
        rows.append(f"| {name} | {batch}x{HEADS}x{t}x{DIM} | {pass_name} | {backend} | {cell('ops')} | {cell('sdpa+mask')} | "
                    f"{cell('flex')} | {ratio('sdpa+mask')} | {ratio('flex')} |")
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_masks needs a CUDA GPU", file=sys.stderr)
        return 2
    flush = l2_flush_buffer()
    rows = []
    for case in cases(torch.Generator().manual_seed(0)):
        rows += run_case(*case, args.reps, flush)
    table = "\n".join([
        f"Attention with masks on {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, median of {args.reps} reps, L2 flushed.",
        "",
        "| case | B x H x T x D | pass | ops backend | ops ms | SDPA + mask ms | FlexAttention ms | SDPA / ops | Flex / ops |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ])
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_masks.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
