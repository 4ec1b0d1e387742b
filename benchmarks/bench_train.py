"""Training throughput of the `seed` (and `llama`) model: each op backend, with and without torch.compile.

    python benchmarks/bench_train.py [--device cuda] [--batch-size 64] [--out DIR]
    python benchmarks/bench_train.py --presets seed,llama --vocab-sizes 8192,50257

Each configuration runs in a fresh process (so peak memory is its own): a few warm-up steps,
then timed optimizer steps of the real training step (forward, label-smoothed loss, backward,
Adam) on random tokens. Prints a markdown table (also written to DIR/bench_train.md) with
tokens/s, peak memory and the speedup over the reference backend.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_one(args) -> dict:
    import torch

    from scratchformer import ops
    from scratchformer.config import preset
    from scratchformer.model import GPT
    from scratchformer.ops import FusedUnavailableError
    from scratchformer.run import check_backend
    from scratchformer.step import autocast

    device = torch.device(args.device)
    amp = "bf16" if device.type == "cuda" else "off"
    config, _ = preset(args.preset)
    config = type(config)(**{**config.__dict__, "vocab_size": args.vocab_size})
    ops.set_backend(args.backend)
    try:
        check_backend(config, device, amp)
    except FusedUnavailableError as e:
        return {"error": str(e).split(": backend 'fused' cannot run: ")[-1].split(". Use")[0]}
    torch.manual_seed(0)
    model = GPT(config).to(device)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    x = torch.randint(0, config.vocab_size, (args.batch_size, config.context), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch_size, config.context), device=device)

    def step():
        with autocast(device, amp):
            loss = step_model(x, targets=y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": args.steps * args.batch_size * config.context / elapsed, "peak_bytes": peak,
            "warmup_s": warmup_s, "params": model.num_parameters()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on GPU, 8 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab-sizes", default="8192", help="comma-separated (50257: GPT-2's, where the loss's memory shows)")
    parser.add_argument("--presets", default="seed", help="comma-separated: seed, llama")
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="reference,torch,fused")
    parser.add_argument("--out", type=Path, help="also write bench_train.md here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (64 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 3)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0

    rows = []
    for name in args.presets.split(","):
        for vocab in args.vocab_sizes.split(","):
            for backend in args.backends.split(","):
                for compiled in (False, True):
                    cmd = [sys.executable, __file__, "--one", "--preset", name, "--backend", backend, "--device", args.device,
                           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--vocab-size", vocab] + (["--compile"] if compiled else [])
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        result = {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
                    else:
                        result = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append((name, vocab, backend, compiled, result))
                    print(f"{name} {vocab} {backend:9} compile={compiled!s:5} {result}", file=sys.stderr, flush=True)

    base = {(n, v, c): r["tokens_per_s"] for n, v, b, c, r in rows if b == "reference" and "tokens_per_s" in r}
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"Training step of the presets' models (4 layers, d_model 512, context 256), batch {args.batch_size}, "
        f"{'bf16 autocast' if gpu else 'fp32'}, on {device_name}, torch {torch.__version__}.",
        "",
        "| preset | vocabulary | backend | torch.compile | tokens/s | peak memory | vs reference (same compile) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, vocab, backend, compiled, r in rows:
        cells = f"| {name} | {vocab} | {backend} | {'yes' if compiled else 'no'} |"
        if "error" in r:
            lines.append(f"{cells} n/a: {r['error']} | | |")
            continue
        memory = f"{r['peak_bytes'] / 2**20:.0f} MiB" + ("" if gpu else " (process RSS)")
        key = (name, vocab, compiled)
        ratio = f"{r['tokens_per_s'] / base[key]:.2f}x" if key in base else ""
        lines.append(f"{cells} {r['tokens_per_s']:,.0f} | {memory} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_train.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
