"""The LM head and its loss: time and peak memory of ops.linear_cross_entropy's chunked path
against F.linear + F.cross_entropy (and, with --compile, torch.compile of the latter).

    python benchmarks/bench_loss.py                      # CPU: N 4096, GPT-2's vocabulary
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16 --out DIR

Each configuration runs forward and backward in its own process, so that its peak memory (CUDA:
the allocator's peak; CPU: the process's peak resident size; of the first call, over what the
process held before it) is its own; the time is the median of the calls after it. Label
smoothing 0.1, as the seed model trains.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from scratchformer import ops

n, d, vocab, dtype, device, how, reps = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
g = torch.Generator(device=device).manual_seed(0)
hidden = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_()
weight = (torch.randn(vocab, d, device=device, generator=g) * d**-0.5).to(dtype).requires_grad_()
targets = torch.randint(0, vocab, (n,), device=device, generator=g)

def torch_loss(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, label_smoothing=0.1)

loss_fn = {"fused": lambda h, w, t: ops.linear_cross_entropy(h, w, t, label_smoothing=0.1, backend="fused"),
           "torch": torch_loss, "torch.compile": torch.compile(torch_loss)}[how]
cuda = device.startswith("cuda")

def step():
    loss = loss_fn(hidden, weight, targets)
    loss.backward()
    hidden.grad = weight.grad = None

def high_water():
    return torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

# The peak is the first call's (the resident size's high-water mark cannot be reset on a CPU),
# over what the process held before it; with torch.compile it includes the compilation.
base = torch.cuda.memory_allocated() if cuda else high_water()
step()
if cuda:
    torch.cuda.synchronize()
peak = high_water() - base
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(json.dumps({"ms": sorted(times)[len(times) // 2] * 1e3, "peak_mb": peak / 2**20}))
"""


def measure(n, d, vocab, dtype, device, how, reps) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps([n, d, vocab, dtype, device, how, reps])],
                            capture_output=True, text=True)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", type=int, default=4096, help="N: tokens in the batch (default 4096; the seed model's is 16384)")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--vocab", default="50257,128256", help="vocabulary sizes, comma-separated (GPT-2's, Llama 3's)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile(F.linear + F.cross_entropy)")
    parser.add_argument("--out", type=Path, help="folder to write bench_loss.md to")
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    hows = ["fused", "torch"] + ["torch.compile"] * args.compile
    lines = [f"LM head + loss, forward and backward, N {args.rows}, d {args.d_model}, {args.dtype} on {args.device}; "
             f"median of {args.reps} reps, each configuration in its own process.", "",
             "| vocabulary | implementation | ms | peak MB | logits alone, MB (fp32) |", "| --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for vocab in (int(v) for v in args.vocab.split(",")):
        for how in hows:
            r = measure(args.rows, args.d_model, vocab, args.dtype, args.device, how, args.reps)
            cells = f"{r['ms']:.1f} | {r['peak_mb']:.0f}" if "error" not in r else f"failed: {r['error']} |"
            lines.append(f"| {vocab} | {how} | {cells} | {args.rows * vocab * 4 / 2**20:.0f} |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_loss.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
