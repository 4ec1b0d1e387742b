"""Check every code point's pre-tokenization against tiktoken's GPT-2 encoder.

    pip install tiktoken; python tools/compare_unicode_with_tiktoken.py

Our letter/number tables come from one Unicode version (see csrc/bpe/unicode_tables.h); a regex
engine with other tables can classify newly assigned code points differently. This encodes each
code point (surrogates aside) between letters, digits, punctuation and spaces with both encoders
and lists the code points whose ids differ.
"""

import lzma
import sys
import tempfile
import unicodedata
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from scratchformer import _bpe
from scratchformer.tokenizer import BPETokenizer

PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def main() -> int:
    assets = resources.files("scratchformer") / "assets" / "gpt2"
    tmp = tempfile.mkdtemp()
    for name in ("encoder.json", "vocab.bpe"):
        Path(tmp, name).write_bytes(lzma.open(assets / f"{name}.xz").read())
    ranks = data_gym_to_mergeable_bpe_ranks(f"{tmp}/vocab.bpe", f"{tmp}/encoder.json")
    theirs = tiktoken.Encoding("gpt2", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    ours = BPETokenizer.from_gpt2()
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"a{chr(c)}b 1{chr(c)}2 !{chr(c)}? x {chr(c)} y" for c in points]
    differ = [c for c, a, b in zip(points, ours.encode_batch(texts, special="text"), theirs.encode_ordinary_batch(texts)) if a != b]
    print(f"our tables: Unicode {_bpe.unicode_version}; tiktoken {tiktoken.__version__}; "
          f"{len(points)} code points checked, {len(differ)} differ")
    for c in differ:
        print(f"U+{c:04X} {unicodedata.category(chr(c))} {unicodedata.name(chr(c), '(unassigned here)')}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
