"""Byte-level BPE tokenizer (GPT-2's scheme): `BPETokenizer`.

    tok = BPETokenizer.from_gpt2()           # GPT-2's own vocabulary (shipped with the package)
    tok = BPETokenizer.train(texts, 8192)    # or learn one
    ids = tok.encode("Hello world")
    tok.decode(ids)

Encoding and training run on the C++ core (scratchformer._bpe, csrc/bpe) where it is built, else
on the pure-Python reference (bpe_reference.py) it is tested against; both give identical ids.
Files in every format it reads and writes: bpe_files.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import resources
from typing import Iterable, Sequence

from tqdm import tqdm

from . import _extensions, bpe_files
from .bpe_files import TokenizerError
from .bpe_reference import encode_piece, pretokenize, train_merges

EOT = "<|endoftext|>"
SPECIAL_MODES = ("error", "allow", "text")
__all__ = ["BPETokenizer", "EOT", "TokenizerError", "vocab_shortfall"]
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
            cached = encode_piece(piece.encode("utf-8"), self.ids, self.ranks, self.tokens)
            if len(self._cache) < 1 << 20:
                self._cache[piece] = cached
        return cached

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
        has `vocab_size` entries, or no piece has two tokens left to merge (see
        `bpe_reference.train_merges`: the C++ core learns the same merges)."""
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
            merges = [tuple(m) for m in merges]
        else:
            tokens, merges = train_merges(texts, n_merges, bar.update)
        # The C++ core reports every 1000 merges, and training stops early when no piece has a
        # pair left: the bar ends at the merges made, full.
        bar.total = len(merges)
        bar.update(len(merges) - bar.n)
        bar.close()
        special = {s: len(tokens) + i for i, s in enumerate(special_tokens)}
        return cls(tokens, merges, special, core)

    # ---- files (bpe_files.py) ----------------------------------------------------------------

    def to_dict(self) -> dict:
        return bpe_files.to_dict(self.tokens, self.merges, self.special)

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer") -> "BPETokenizer":
        tokens, merges, special = bpe_files.from_dict(data, source)
        try:
            return cls(tokens, merges, special)
        except IndexError:
            raise TokenizerError(f"{source}: a merge refers to a token id outside the vocabulary") from None
        except TokenizerError as e:
            raise TokenizerError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON (atomically: a temporary file, then a rename)."""
        bpe_files.save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        return cls.from_dict(bpe_files.load_json(path), str(path))

    @classmethod
    def from_gpt2(
        cls, encoder_json: str | os.PathLike | None = None, vocab_bpe: str | os.PathLike | None = None
    ) -> "BPETokenizer":
        """GPT-2's vocabulary from its encoder.json and vocab.bpe (.xz accepted); by default the
        copies shipped with scratchformer."""
        assets = resources.files("scratchformer") / "assets" / "gpt2"
        return cls(*bpe_files.read_gpt2(encoder_json or assets / "encoder.json.xz", vocab_bpe or assets / "vocab.bpe.xz"))

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, special_tokens: Sequence[str] = (EOT,)) -> "BPETokenizer":
        """A vocabulary from tiktoken's rank file (`base64-token rank` per line, .xz accepted),
        such as r50k_base.tiktoken."""
        return cls(*bpe_files.read_tiktoken(path, special_tokens))

    def fingerprint(self) -> str:
        """A short hash of the vocabulary, to tell whether cached token ids are still valid."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def vocab_shortfall(tokenizer: BPETokenizer, asked: int, text: str) -> str:
    """Why a trained BPE has fewer tokens than asked for."""
    return (f"the BPE has {tokenizer.vocab_size} tokens, not the {asked} asked for: after {len(tokenizer.merges)} merges no "
            f"word of {text} has two tokens left to merge (more text allows a larger vocabulary)")
