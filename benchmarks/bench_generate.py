"""Decoding speed of the `seed` model at context 256: with the KV cache against without it.

    python benchmarks/bench_generate.py [--device cuda] [--out DIR]

Greedy decoding of up to the full context from a short prompt, batch 1. With the cache each
step runs the model on the newest token only (`GPT.generate`); without it,
each step runs the whole sequence again. Both must produce the same tokens. Prints a markdown
table (also written to DIR/bench_generate.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from scratchformer.config import preset
from scratchformer.model import GPT


@torch.no_grad()
def without_cache(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = torch.tensor([prompt], device=next(model.parameters()).device)
    for _ in range(new_tokens):
        token = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, token], dim=1)
    return tokens[0, len(prompt):].tolist()


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    config, _ = preset("seed")
    config = type(config)(**{**config.__dict__, "vocab_size": args.vocab_size})
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,)).tolist()
    new_tokens = config.context - args.prompt_tokens

    model.generate(prompt, 8, temperature=0)  # warm-up
    without_cache(model, prompt, 8)
    cached, t_cached = timed(lambda: model.generate(prompt, new_tokens, temperature=0)[len(prompt):].tolist(), device)
    full, t_full = timed(lambda: without_cache(model, prompt, new_tokens), device)

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    table = "\n".join([
        f"Greedy decoding with the `seed` model (random weights, vocab {args.vocab_size}), batch 1, "
        f"{args.prompt_tokens}-token prompt, {new_tokens} new tokens (context {config.context}), fp32, "
        f"on {device_name}, torch {torch.__version__}.",
        "",
        "| decoding | tokens/s | time | speedup |",
        "| --- | --- | --- | --- |",
        f"| without cache (whole sequence each step) | {new_tokens / t_full:,.1f} | {t_full:.2f} s | 1.00x |",
        f"| KV cache | {new_tokens / t_cached:,.1f} | {t_cached:.2f} s | {t_full / t_cached:.2f}x |",
        "",
        f"Same tokens both ways: {'yes' if cached == full else 'NO'}.",
    ])
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_generate.md").write_text(table + "\n")
    return 0 if cached == full else 1


if __name__ == "__main__":
    sys.exit(main())
