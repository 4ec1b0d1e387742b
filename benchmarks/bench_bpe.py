"""Tokenizer speed: scratchformer's C++ core against tiktoken and HF tokenizers, same vocabulary.

    pip install --no-build-isolation ".[bench]"; python benchmarks/bench_bpe.py [--out DIR]

All three encode WikiText-2 valid+test with GPT-2's vocabulary (the files shipped with
scratchformer) and must give identical ids. Reports, in one run:
- single-thread encode throughput (MB/s of UTF-8 input, best of several runs);
- batch throughput on all cores (the text split into articles);
- scaling on runs of one repeated character (300 KB and 3 MB: linear means a ratio near 10);
- training a 32k vocabulary on the same text, against HF tokenizers' BPE trainer.
Prints a markdown table (also DIR/bench_bpe.md) and plots throughput (DIR/bench_bpe.png).
"""

from __future__ import annotations

import argparse
import lzma
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from scratchformer import data
from scratchformer.tokenizer import EOT, BPETokenizer

PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        import tiktoken
        import tokenizers
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    except ImportError as e:
        sys.exit(f"bench_bpe needs tiktoken and tokenizers: pip install '.[bench]' ({e})")

    assets = resources.files("scratchformer") / "assets" / "gpt2"
    tmp = tempfile.mkdtemp()
    for name in ("encoder.json", "vocab.bpe"):
        Path(tmp, name).write_bytes(lzma.open(assets / f"{name}.xz").read())
    ours = BPETokenizer.from_gpt2()
    if ours.core != "cpp":
        sys.exit("bench_bpe: the C++ core (scratchformer._bpe) is not built")
    tik = tiktoken.Encoding("gpt2", pat_str=PATTERN, special_tokens={EOT: 50256},
                            mergeable_ranks=data_gym_to_mergeable_bpe_ranks(f"{tmp}/vocab.bpe", f"{tmp}/encoder.json"))
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(f"{tmp}/encoder.json", f"{tmp}/vocab.bpe"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)

    text = data._shipped("wiki.valid.raw.xz") + data._shipped("wiki.test.raw.xz")
    size = len(text.encode())
    articles = data.wikitext_articles(text)
    encoders = {
        "scratchformer": (ours.encode_ordinary, lambda docs: ours.encode_batch(docs, special="text")),
        "tiktoken": (tik.encode_ordinary, lambda docs: tik.encode_ordinary_batch(docs, num_threads=os.cpu_count())),
        "HF tokenizers": (lambda t: hf.encode(t).ids, lambda docs: [e.ids for e in hf.encode_batch(docs)]),
    }
    reference = ours.encode_ordinary(text)
    single, batch, same = {}, {}, {}
    for name, (one, many) in encoders.items():
        same[name] = one(text) == reference and sum(many(articles), []) == sum((ours.encode_ordinary(a) for a in articles), [])
        single[name] = size / best_time(lambda: one(text), args.repeats) / 1e6
        batch[name] = size / best_time(lambda: many(articles), args.repeats) / 1e6
        print(f"{name}: {single[name]:.1f} MB/s single, {batch[name]:.1f} MB/s batch, same ids: {same[name]}", file=sys.stderr)

    scaling = {}
    for name, (one, _) in encoders.items():
        short, long_ = "a" * 300_000, "a" * 3_000_000
        t_short = best_time(lambda: one(short), 7)
        t_long = best_time(lambda: one(long_), 3)
        scaling[name] = (t_short, t_long)

    t0 = time.perf_counter()
    trained = BPETokenizer.train([text], 32_000)
    t_ours = time.perf_counter() - t0
    hf_train = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf_train.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=32_000, special_tokens=[EOT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    t0 = time.perf_counter()
    hf_train.train_from_iterator([text], trainer)
    t_hf = time.perf_counter() - t0

    base = single["tiktoken"]
    lines = [
        f"GPT-2 vocabulary, WikiText-2 valid+test ({size / 1e6:.2f} MB), {os.cpu_count()} cores, "
        f"tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}.",
        "",
        "| encoder | single thread MB/s | vs tiktoken | batch MB/s (all cores) | 300 KB of 'a' | 3 MB of 'a' | ratio | same ids |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in encoders:
        t_short, t_long = scaling[name]
        lines.append(f"| {name} | {single[name]:.1f} | {single[name] / base:.2f}x | {batch[name]:.1f} | "
                     f"{t_short * 1e3:.1f} ms | {t_long * 1e3:.1f} ms | {t_long / t_short:.1f} | {'yes' if same[name] else 'NO'} |")
    lines += [
        "",
        "| training 32k vocabulary on the same text | seconds |",
        "| --- | --- |",
        f"| scratchformer ({trained.vocab_size} tokens) | {t_ours:.2f} |",
        f"| HF tokenizers BpeTrainer ({hf_train.get_vocab_size()} tokens) | {t_hf:.2f} |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_bpe.md").write_text(table + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(encoders)
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [single[n] for n in names], 0.4, label="single thread")
        ax.bar([i + 0.2 for i in x], [batch[n] for n in names], 0.4, label=f"batch, {os.cpu_count()} cores")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("MB/s (WikiText-2, GPT-2 vocabulary)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "bench_bpe.png", dpi=120)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
