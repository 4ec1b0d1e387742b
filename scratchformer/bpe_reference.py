"""The pure-Python reference of byte-level BPE: GPT-2's pre-tokenization, the merge of one piece,
and the training of merges. It is the specification the C++ core (csrc/bpe) is tested against;
correct, not fast.

Text is split into pieces by GPT-2's pattern, each piece's UTF-8 bytes start as one token per
byte, and adjacent tokens are merged in the order the merges were learned (lowest rank first)
until no learned merge applies. So every string round-trips exactly, whatever its script.
"""

from __future__ import annotations

import functools
import heapq
import re
from collections import Counter, defaultdict
from typing import Callable, Iterable

from ._unicode_tables import LETTER_RANGES, NUMBER_RANGES

# Unicode's White_Space property (what \s means in GPT-2's regex engines); str.isspace() differs
# (it also counts U+001C..U+001F).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def _char_class(ranges: list[tuple[int, int]]) -> str:
    """A regex character class body for code point ranges."""
    esc = lambda cp: f"\\U{cp:08x}"  # noqa: E731
    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


@functools.lru_cache(maxsize=1)
def gpt2_pattern() -> re.Pattern:
    """GPT-2's pre-tokenization pattern for Python's `re`, which lacks \\p{L} and \\p{N}:
    `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`
    with the letter and number classes spelled out from the generated tables the C++ core uses
    too (tools/gen_unicode_tables.py)."""
    letters, numbers = _char_class(LETTER_RANGES), _char_class(NUMBER_RANGES)
    space = re.escape(WHITESPACE)
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"
        rf"|[{space}]+(?![^{space}])|[{space}]+"
    )


def pretokenize(text: str) -> list[str]:
    """The pieces GPT-2 encodes separately (no merge ever crosses a piece boundary)."""
    return gpt2_pattern().findall(text)


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """ids with every occurrence of `pair`, left to right, replaced by new_id."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def encode_piece(piece: bytes, ids: dict[bytes, int], ranks: dict[tuple[int, int], int], tokens: list[bytes]) -> list[int]:
    """Token ids of one piece: its bytes, merged pair by pair, lowest rank first."""
    parts = [ids[bytes([b])] for b in piece]
    while len(parts) > 1:
        # Merge the adjacent pair learned first, everywhere it occurs, then look again.
        best = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, 1 << 62))
        if best not in ranks:
            break
        parts = merge_pair(parts, best, ids[tokens[best[0]] + tokens[best[1]]])
    return parts


def train_merges(texts: Iterable[str], n_merges: int, on_merge: Callable[[], None] = lambda: None
                 ) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Up to `n_merges` merges learned from `texts`, and the tokens (256 bytes, then one per merge).

    Each step merges the most frequent adjacent pair within the pre-tokenized pieces; ties go to
    the pair whose (left bytes, right bytes) sorts first, so training is deterministic. Pair
    counts are updated incrementally, only for the pieces a merge touches.
    """
    counts = Counter(piece for text in texts for piece in pretokenize(text))
    words = [list(piece.encode("utf-8")) for piece in counts]
    freq = list(counts.values())
    tokens = [bytes([b]) for b in range(256)]

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, f) in enumerate(zip(words, freq)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += f
            where[pair].add(w)

    def key(pair):  # heap order: most frequent, then smallest bytes
        return (-pair_count[pair], tokens[pair[0]], tokens[pair[1]], pair)

    heap = [key(p) for p in pair_count]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges and heap:
        neg, _, _, pair = heapq.heappop(heap)
        if -neg != pair_count.get(pair, 0):
            continue  # stale heap entry
        new_id = len(tokens)
        tokens.append(tokens[pair[0]] + tokens[pair[1]])
        merges.append(pair)
        changed = set()
        for w in where.pop(pair):
            word, f = words[w], freq[w]
            for p in zip(word, word[1:]):
                pair_count[p] -= f
                changed.add(p)
            words[w] = merged = merge_pair(word, pair, new_id)
            for p in zip(merged, merged[1:]):
                pair_count[p] += f
                where[p].add(w)
                changed.add(p)
        pair_count.pop(pair, None)
        for p in changed:
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, key(p))
            else:
                pair_count.pop(p, None)
        on_merge()
    return tokens, merges
