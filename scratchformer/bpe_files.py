"""Tokenizer files: scratchformer's own JSON, GPT-2's encoder.json + vocab.bpe, tiktoken's rank
files. Each reader returns the vocabulary as (tokens, merges, special): token bytes by id, merges
by rank as (left id, right id), special token text -> id."""

from __future__ import annotations

import base64
import json
import lzma
import os
from pathlib import Path
from typing import Sequence

from .bpe_reference import encode_piece
from .files import atomic_write

Vocabulary = tuple[list[bytes], list[tuple[int, int]], dict[str, int]]


class TokenizerError(ValueError):
    """A malformed tokenizer file or a bad argument."""


def to_dict(tokens: Sequence[bytes], merges: Sequence[tuple[int, int]], special: dict[str, int]) -> dict:
    return {
        "format": "scratchformer-bpe",
        "version": 1,
        "pattern": "gpt2",
        "tokens": [base64.b64encode(b).decode("ascii") for b in tokens],
        "merges": [list(m) for m in merges],
        "special": special,
    }


def from_dict(data: dict, source: str = "tokenizer") -> Vocabulary:
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
    return tokens, merges, special


def save_json(data: dict, path: str | os.PathLike) -> None:
    """Write a tokenizer's dict as JSON (atomically: a temporary file, then a rename)."""
    with atomic_write(Path(path), "w", encoding="utf-8") as f:
        json.dump(data, f)


def load_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such tokenizer file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not a JSON tokenizer file ({e})") from None


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, as used in encoder.json and vocab.bpe."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def open_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 file, xz-compressed when its name ends in .xz."""
    opener = lzma.open if str(path).endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return f.read()


def read_gpt2(encoder_json, vocab_bpe) -> Vocabulary:
    """GPT-2's vocabulary from its encoder.json and vocab.bpe (.xz accepted)."""
    alphabet = {c: b for b, c in enumerate(byte_alphabet())}

    def to_bytes(token: str, where: str) -> bytes:
        try:
            return bytes(alphabet[c] for c in token)
        except KeyError as e:
            raise TokenizerError(f"{where}: {token!r} has a character outside GPT-2's byte alphabet: {e}") from None

    try:
        encoder = json.loads(open_text(encoder_json))
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
    for n, line in enumerate(open_text(vocab_bpe).split("\n"), start=1):
        if not line or line.startswith("#version"):
            continue
        fields = line.split(" ")
        if len(fields) != 2:
            raise TokenizerError(f"{vocab_bpe}:{n}: expected two tokens separated by one space, got {line!r}")
        left, right = (to_bytes(f, f"{vocab_bpe}:{n}") for f in fields)
        if left not in ids or right not in ids or left + right not in ids:
            raise TokenizerError(f"{vocab_bpe}:{n}: merge {line!r} refers to a token not in {encoder_json}")
        merges.append((ids[left], ids[right]))
    return tokens, merges, special


def read_tiktoken(path: str | os.PathLike, special_tokens: Sequence[str]) -> Vocabulary:
    """A vocabulary from tiktoken's rank file (`base64-token rank` per line, .xz accepted). The
    file has ranks only: each merge is recovered by encoding the token with the merges before it,
    which must give exactly two parts."""
    ordered = _tiktoken_ranks(path)
    # Rebuild the merges in rank order with the reference encoder, growing as it goes.
    tokens = [bytes([b]) for b in range(256)]
    ids = {b: i for i, b in enumerate(tokens)}
    ranks: dict[tuple[int, int], int] = {}
    final = {b: i for i, b in enumerate(ordered)}
    merges = []
    for rank, token in enumerate(ordered):
        if len(token) < 2:
            continue
        parts = encode_piece(token, ids, ranks, tokens)
        if len(parts) != 2:
            raise TokenizerError(f"{path}: token of rank {rank} ({token!r}) is not the merge of two earlier tokens")
        merges.append((final[tokens[parts[0]]], final[tokens[parts[1]]]))
        ranks[(parts[0], parts[1])] = len(ranks)
        ids[token] = len(tokens)
        tokens.append(token)
    return ordered, merges, {t: len(ordered) + i for i, t in enumerate(special_tokens)}


def _tiktoken_ranks(path: str | os.PathLike) -> list[bytes]:
    tokens: dict[int, bytes] = {}
    for n, line in enumerate(open_text(path).splitlines(), start=1):
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
    return ordered
