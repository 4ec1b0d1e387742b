"""Byte-level BPE tokenizer (GPT-2's scheme), in pure Python.

Text is split into pieces by GPT-2's pattern, each piece's UTF-8 bytes start as one token per
byte, and adjacent tokens are merged in the order the merges were learned (lowest rank first)
until no learned merge applies. So every string round-trips exactly, whatever its script.

    tok = BPETokenizer.from_gpt2()           # GPT-2's own vocabulary (shipped with the package)
    tok = BPETokenizer.train(texts, 8192)    # or learn one
    ids = tok.encode("Hello world")
    tok.decode(ids)

This module is the specification the C++ core is tested against; it is correct, not fast.
"""

from __future__ import annotations

import base64
import functools
import heapq
import json
import lzma
import os
import re
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from . import _extensions
from .files import atomic_write
from ._unicode_tables import LETTER_RANGES, NUMBER_RANGES

EOT = "<|endoftext|>"
SPECIAL_MODES = ("error", "allow", "text")

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


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, as used in encoder.json and vocab.bpe."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _open_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 file, xz-compressed when its name ends in .xz."""
    opener = lzma.open if str(path).endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return f.read()


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


class TokenizerError(ValueError):
    """A malformed tokenizer file or a bad argument."""


CORES = ("auto", "cpp", "python")


def _choose_core(core: str) -> str:
    if core not in CORES:
        raise TokenizerError(f"core must be one of {', '.join(CORES)}, not {core!r}")
    if core == "python" or (core == "auto" and _extensions.bpe is None):
        return "python"
    if _extensions.bpe is None:
        raise TokenizerError(f"core 'cpp' needs the scratchformer._bpe extension, which did not load: {_extensions.bpe_error}")
    return "cpp"


class BPETokenizer:
    """A byte-level BPE vocabulary: token bytes by id, merges by rank, special tokens."""

    def __init__(
        self,
        tokens: Sequence[bytes],
        merges: Sequence[tuple[int, int]],
        special: dict[str, int] | None = None,
        core: str = "auto",
    ):
        """core: "cpp" (the compiled scratchformer._bpe), "python" (this file's reference
        implementation) or "auto" (cpp when it is built). Both give identical ids."""
        self.core = _choose_core(core)
        self.tokens = list(tokens)  # id -> bytes
        self.merges = list(merges)  # rank -> (left id, right id)
        self.special = dict(special or {})  # text -> id
        self.ids = {b: i for i, b in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            raise TokenizerError("duplicate token bytes in the vocabulary")
        if sum(len(b) == 1 for b in self.tokens) != 256:
            raise TokenizerError("a byte-level vocabulary needs one token for each of the 256 bytes")
        self.ranks: dict[tuple[int, int], int] = {}
        for rank, (a, b) in enumerate(self.merges):
            merged = self.tokens[a] + self.tokens[b]
            if merged not in self.ids:
                raise TokenizerError(f"merge {rank} makes {merged!r}, which is not in the vocabulary")
            if (a, b) in self.ranks:
                raise TokenizerError(f"merge {rank} repeats merge {self.ranks[(a, b)]}")
            self.ranks[(a, b)] = rank
        self._special_ids = {i: t for t, i in self.special.items()}
        if sorted(self._special_ids) != list(range(len(self.tokens), self.vocab_size)):
            raise TokenizerError("special token ids must be distinct and directly follow the other tokens")
        self._special_re = (
            re.compile("|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))) if self.special else None
        )
        self._cache: dict[str, list[int]] = {}
        self._encoder = _extensions.bpe.Encoder(self.tokens, self.merges) if self.core == "cpp" else None

    # ---- encoding --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.tokens) + len(self.special)

    @property
    def eot_id(self) -> int | None:
        return self.special.get(EOT)

    # tiktoken's names for the same things, for code written against tiktoken.
    n_vocab = vocab_size
    eot_token = eot_id

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: bytes | str) -> int:
        """The id of one token: its bytes, or a special token's text (`"<|endoftext|>"`)."""
        key = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        special = key.decode("utf-8", errors="replace")
        if special in self.special:
            return self.special[special]
        if key not in self.ids:
            raise KeyError(f"{token!r} is not a single token of this vocabulary (encode() splits text into tokens)")
        return self.ids[key]

    def id_to_token(self, id: int) -> bytes:
        """The bytes of token `id` (a special token's text as UTF-8)."""
        if 0 <= id < len(self.tokens):
            return self.tokens[id]
        if id in self._special_ids:
            return self._special_ids[id].encode("utf-8")
        raise KeyError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")

    def _encode_piece(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is None:
            cached = self._encode_piece_bytes(piece.encode("utf-8"))
            if len(self._cache) < 1 << 20:
                self._cache[piece] = cached
        return cached

    def _encode_piece_bytes(self, piece: bytes) -> list[int]:
        parts = [self.ids[bytes([b])] for b in piece]
        while len(parts) > 1:
            # Merge the adjacent pair learned first, everywhere it occurs, then look again.
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, 1 << 62))
            if best not in self.ranks:
                break
            parts = merge_pair(parts, best, self.ids[self.tokens[best[0]] + self.tokens[best[1]]])
        return parts

    def _add_merge(self, left: int, right: int) -> None:
        """Append a merge and its token (while rebuilding a vocabulary; Python core only)."""
        merged = self.tokens[left] + self.tokens[right]
        self.ranks[(left, right)] = len(self.merges)
        self.merges.append((left, right))
        self.ids[merged] = len(self.tokens)
        self.tokens.append(merged)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, treating special-token strings as plain text."""
        if self._encoder is not None:
            return self._encoder.encode(text)
        return [i for piece in pretokenize(text) for i in self._encode_piece(piece)]

    def encode(self, text: str, special: str = "error") -> list[int]:
        """Token ids of `text`.

        special: what to do with special-token strings (such as <|endoftext|>) in the text:
        "error" (the default: raise, so user text cannot inject control tokens), "allow"
        (encode them as their special ids) or "text" (encode them as ordinary text).
        """
        if special not in SPECIAL_MODES:
            raise TokenizerError(f"special must be one of {', '.join(SPECIAL_MODES)}, not {special!r}")
        if special == "text" or self._special_re is None:
            return self.encode_ordinary(text)
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            if special == "error":
                raise TokenizerError(
                    f"the text contains the special token {match.group()!r} at character {match.start()}: "
                    "pass special='allow' to encode it as a special token or special='text' to encode it as text"
                )
            ids += self.encode_ordinary(text[start : match.start()])
            ids.append(self.special[match.group()])
            start = match.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_batch(self, texts: Iterable[str], special: str = "error", threads: int | None = None) -> list[list[int]]:
        """encode() of each text; with the C++ core, on `threads` threads (default: all cores)
        without holding the GIL."""
        texts = list(texts)
        plain = special == "text" or self._special_re is None or not any(map(self._special_re.search, texts))
        if self._encoder is None or not plain:
            return [self.encode(t, special) for t in texts]
        return self._encoder.encode_batch(texts, threads or os.cpu_count() or 1)

    # ---- decoding --------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = []
        for i in ids:
            if 0 <= i < len(self.tokens):
                out.append(self.tokens[i])
            elif i in self._special_ids:
                out.append(self._special_ids[i].encode("utf-8"))
            else:
                raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return b"".join(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (a character cut between tokens) are
        handled by `errors` as in bytes.decode: "replace" (U+FFFD), "strict" or "ignore"."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # ---- training --------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = (EOT,),
        progress: bool = False,
        core: str = "auto",
    ) -> "BPETokenizer":
        """Learn merges from `texts` until the vocabulary (256 bytes + merges + special tokens)
        has `vocab_size` entries, or no piece has two tokens left to merge.

        Each step merges the most frequent adjacent pair within the pre-tokenized pieces; ties go
        to the pair whose (left bytes, right bytes) sorts first, so training is deterministic.
        Pair counts are updated incrementally, only for the pieces a merge touches.
        """
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise TokenizerError(f"vocab_size must be at least {256 + len(special_tokens)} (256 bytes + special tokens)")
        core = _choose_core(core)
        bar = tqdm(total=n_merges, desc="training BPE", unit="merge", disable=not progress)
        if core == "cpp":
            done = [0]

            def report(merges: int) -> None:
                bar.update(merges - done[0])
                done[0] = merges

            tokens, merges = _extensions.bpe.train(list(texts), n_merges, report if progress else None)
            bar.close()
            special = {s: len(tokens) + i for i, s in enumerate(special_tokens)}
            return cls(tokens, [tuple(m) for m in merges], special, core)
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
            bar.update()
        bar.close()
        special = {s: len(tokens) + i for i, s in enumerate(special_tokens)}
        return cls(tokens, merges, special, core)

    # ---- files -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": "scratchformer-bpe",
            "version": 1,
            "pattern": "gpt2",
            "tokens": [base64.b64encode(b).decode("ascii") for b in self.tokens],
            "merges": [list(m) for m in self.merges],
            "special": self.special,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer") -> "BPETokenizer":
        if not isinstance(data, dict) or data.get("format") != "scratchformer-bpe":
            raise TokenizerError(f"{source}: not a scratchformer tokenizer (no 'format': 'scratchformer-bpe')")
        if data.get("version") != 1:
            raise TokenizerError(f"{source}: unsupported tokenizer version {data.get('version')!r}")
        try:
            tokens = [base64.b64decode(t, validate=True) for t in data["tokens"]]
            merges = [(int(a), int(b)) for a, b in data["merges"]]
            special = {str(k): int(v) for k, v in data["special"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerError(f"{source}: malformed tokenizer file ({type(e).__name__}: {e})") from None
        try:
            return cls(tokens, merges, special)
        except IndexError:
            raise TokenizerError(f"{source}: a merge refers to a token id outside the vocabulary") from None
        except TokenizerError as e:
            raise TokenizerError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON (atomically: a temporary file, then a rename)."""
        path = Path(path)
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no such tokenizer file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not a JSON tokenizer file ({e})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_gpt2(
        cls, encoder_json: str | os.PathLike | None = None, vocab_bpe: str | os.PathLike | None = None
    ) -> "BPETokenizer":
        """GPT-2's vocabulary from its encoder.json and vocab.bpe (.xz accepted); by default the
        copies shipped with scratchformer."""
        assets = resources.files("scratchformer") / "assets" / "gpt2"
        encoder_json = encoder_json or assets / "encoder.json.xz"
        vocab_bpe = vocab_bpe or assets / "vocab.bpe.xz"
        alphabet = {c: b for b, c in enumerate(_byte_alphabet())}

        def to_bytes(token: str, where: str) -> bytes:
            try:
                return bytes(alphabet[c] for c in token)
            except KeyError as e:
                raise TokenizerError(f"{where}: {token!r} has a character outside GPT-2's byte alphabet: {e}") from None

        try:
            encoder = json.loads(_open_text(encoder_json))
        except (OSError, json.JSONDecodeError, lzma.LZMAError) as e:
            raise TokenizerError(f"{encoder_json}: cannot read GPT-2 encoder ({e})") from None
        special = {t: i for t, i in encoder.items() if t.startswith("<|") and t.endswith("|>")}
        ordinary = {to_bytes(t, str(encoder_json)): i for t, i in encoder.items() if t not in special}
        if sorted(ordinary.values()) != list(range(len(ordinary))):
            raise TokenizerError(f"{encoder_json}: token ids must be 0..{len(ordinary) - 1}, each once")
        tokens = [b""] * len(ordinary)
        for b, i in ordinary.items():
            tokens[i] = b
        ids = {b: i for i, b in enumerate(tokens)}
        merges = []
        lines = _open_text(vocab_bpe).split("\n")
        for n, line in enumerate(lines, start=1):
            if not line or line.startswith("#version"):
                continue
            fields = line.split(" ")
            if len(fields) != 2:
                raise TokenizerError(f"{vocab_bpe}:{n}: expected two tokens separated by one space, got {line!r}")
            left, right = (to_bytes(f, f"{vocab_bpe}:{n}") for f in fields)
            if left not in ids or right not in ids or left + right not in ids:
                raise TokenizerError(f"{vocab_bpe}:{n}: merge {line!r} refers to a token not in {encoder_json}")
            merges.append((ids[left], ids[right]))
        return cls(tokens, merges, special)

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, special_tokens: Sequence[str] = (EOT,)) -> "BPETokenizer":
        """A vocabulary from tiktoken's rank file (`base64-token rank` per line, .xz accepted),
        such as r50k_base.tiktoken. The file has ranks only: each merge is recovered by encoding
        the token with the merges before it, which must give exactly two parts."""
        tokens: dict[int, bytes] = {}
        for n, line in enumerate(_open_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError("expected a base64 token and a rank")
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except ValueError as e:
                raise TokenizerError(f"{path}:{n}: {e}: {line[:60]!r}") from None
            if rank in tokens:
                raise TokenizerError(f"{path}:{n}: rank {rank} appears twice")
            tokens[rank] = token
        if sorted(tokens) != list(range(len(tokens))):
            raise TokenizerError(f"{path}: ranks must be 0..{len(tokens) - 1}, each once")
        ordered = [tokens[i] for i in range(len(tokens))]
        if len(set(ordered)) != len(ordered):
            raise TokenizerError(f"{path}: a token appears twice")
        # Rebuild the merges in rank order with the pure-Python encoder, growing as it goes.
        partial = cls([bytes([b]) for b in range(256)], [], core="python")
        ids = {b: i for i, b in enumerate(ordered)}
        merges = []
        for rank, token in enumerate(ordered):
            if len(token) < 2:
                continue
            parts = partial._encode_piece_bytes(token)
            if len(parts) != 2:
                raise TokenizerError(f"{path}: token of rank {rank} ({token!r}) is not the merge of two earlier tokens")
            left, right = (partial.tokens[p] for p in parts)
            merges.append((ids[left], ids[right]))
            partial._add_merge(parts[0], parts[1])
        return cls(ordered, merges, {t: len(ordered) + i for i, t in enumerate(special_tokens)})

    def fingerprint(self) -> str:
        """A short hash of the vocabulary, to tell whether cached token ids are still valid."""
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
