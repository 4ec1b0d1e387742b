"""Corpora, token caches, and the batches the model trains and is evaluated on.

Corpora:
- `wikitext2-mini`: WikiText-2's validation split to train on and its test split to evaluate on,
  both shipped with the package: no network needed. For demos and tests, not for comparing with
  published numbers.
- `wikitext2`: WikiText-2 raw; the train split is downloaded on first use (checked against its
  published size and SHA-256), validation and test are shipped.
- a path: a text file, or a folder of .txt files (each file one document); the last tenth of the
  documents (of the lines, for a single file) is held out for evaluation.

WikiText articles are split at their top-level ` = Title = ` headings; documents are joined with
<|endoftext|>. Each split is tokenized once and cached in a flat array behind a header naming
the tokenizer and the source's SHA-256, so a stale cache is rebuilt, never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import re
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .files import atomic_write
from .tokenizer import BPETokenizer


class DataError(ValueError):
    """Missing, empty, corrupt or unobtainable data."""


@dataclass(frozen=True)
class Split:
    name: str  # e.g. "wikitext2-mini/train"
    documents: list[str]
    sha256: str  # of the source text
    words: int  # whitespace-separated words in the source, for word-level perplexity


@dataclass(frozen=True)
class RemoteArchive:
    """A zip archive on the web holding one file we need, with the checksums to trust it by."""

    urls: tuple[str, ...]
    size: int
    sha256: str
    member: str
    member_size: int
    member_sha256: str


WIKITEXT2_TRAIN = RemoteArchive(
    urls=(
        "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
    ),
    size=4_721_645,
    sha256="ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
    member="wikitext-2-raw/wiki.train.raw",
    member_size=10_940_747,
    member_sha256="6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57",
)

CORPORA = ("wikitext2-mini", "wikitext2")


def cache_dir() -> Path:
    """$SCRATCHFORMER_CACHE, else $XDG_CACHE_HOME/scratchformer, else ~/.cache/scratchformer."""
    if os.environ.get("SCRATCHFORMER_CACHE"):
        return Path(os.environ["SCRATCHFORMER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "scratchformer"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, size: int, sha256: str, progress: bool) -> None:
    """Download url to dest through a temporary file; raise DataError on a size or hash mismatch."""
    digest, got = hashlib.sha256(), 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as tmp, urllib.request.urlopen(url, timeout=30) as response:
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {dest.name}", disable=not progress)
        for chunk in iter(lambda: response.read(1 << 16), b""):
            tmp.write(chunk)
            digest.update(chunk)
            got += len(chunk)
            bar.update(len(chunk))
        bar.close()
        if got != size or digest.hexdigest() != sha256:  # raised inside the block: dest is left as it was
            raise DataError(f"{url} gave {got} bytes with SHA-256 {digest.hexdigest()}, expected {size} bytes with {sha256}")


def fetch_archive_member(remote: RemoteArchive, dest: Path, progress: bool = True) -> Path:
    """`dest` holding remote.member, verified. Uses a verified copy already at dest, or the
    archive placed beside it by hand, before downloading from remote.urls in turn."""
    if dest.exists() and dest.stat().st_size == remote.member_size and sha256_file(dest) == remote.member_sha256:
        return dest
    archive = dest.parent / Path(remote.urls[0]).name
    errors = []
    if not (archive.exists() and archive.stat().st_size == remote.size and sha256_file(archive) == remote.sha256):
        for url in remote.urls:
            try:
                _fetch(url, archive, remote.size, remote.sha256, progress)
                break
            except (urllib.error.URLError, OSError, DataError) as e:
                errors.append(f"{url}: {e}")
        else:
            raise DataError(
                f"could not download {archive.name} ({'; '.join(errors)}). Without network access, "
                f"put {archive.name} (SHA-256 {remote.sha256}) or {Path(remote.member).name} "
                f"(SHA-256 {remote.member_sha256}) into {dest.parent} by hand"
            )
    try:
        with zipfile.ZipFile(archive) as z, z.open(remote.member) as src:
            data = src.read()
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{archive}: cannot extract {remote.member} ({e})") from None
    if len(data) != remote.member_size or hashlib.sha256(data).hexdigest() != remote.member_sha256:
        raise DataError(f"{archive}: {remote.member} does not match its published size and SHA-256")
    with atomic_write(dest) as tmp:
        tmp.write(data)
    return dest


_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)


def wikitext_articles(text: str) -> list[str]:
    """Split WikiText at its top-level ` = Title = ` heading lines, one article each."""
    starts = [m.start() for m in _HEADING.finditer(text)]
    if not starts:
        return [text] if text.strip() else []
    if text[: starts[0]].strip():
        starts.insert(0, 0)  # text before the first heading is a document of its own
    else:
        starts[0] = 0  # blank lines before it belong to the first article
    return [text[s:e] for s, e in zip(starts, starts[1:] + [len(text)])]


_DETOKENIZE = [
    (re.compile(r" @(.)@ "), r"\1"),  # 1 @,@ 000 -> 1,000; 3 @.@ 5 -> 3.5; well @-@ known -> well-known
    (re.compile(r" (?=[.,;:!?)\]}]|'s\b|'re\b|'ve\b|'m\b|'ll\b|'d\b|n't\b)"), ""),  # no space before these
    (re.compile(r"([(\[{]) "), r"\1"),  # nor after an opening bracket
    (re.compile(r"(?<==) (?==)"), ""),  # heading marks: = = Title = = -> == Title ==
]


def wikitext_detokenize(split: Split) -> Split:
    """WikiText's text with its tokenization undone ("1 @,@ 000" -> "1,000", "word ." -> "word."),
    as the GPT-2 paper evaluated it, keeping the word count of the original for word-level
    perplexity."""
    documents = []
    for doc in split.documents:
        for pattern, replacement in _DETOKENIZE:
            doc = pattern.sub(replacement, doc)
        documents.append(doc)
    return dataclasses.replace(_split(split.name + " detokenized", "".join(documents), documents), words=split.words)


def _split(name: str, text: str, documents: list[str]) -> Split:
    return Split(name, documents, hashlib.sha256(text.encode("utf-8")).hexdigest(), len(text.split()))


def _shipped(file: str) -> str:
    path = resources.files("scratchformer") / "assets" / "wikitext-2" / file
    with lzma.open(path, "rt", encoding="utf-8", newline="") as f:
        return f.read()


def _wikitext(name: str, text: str) -> Split:
    return _split(name, text, wikitext_articles(text))


# Bytes that are not UTF-8 (seen as lone surrogates) and control characters other than whitespace.
_CONTROL_CHARS = "\x00-\x08\x0e-\x1f\x7f"
_CONTROL = re.compile(f"[{_CONTROL_CHARS}]")
_NOT_TEXT = re.compile(f"[\udc80-\udcff{_CONTROL_CHARS}]")
MAX_NOT_TEXT = 0.1  # the share of such characters above which a file is refused as not text


def _read_text(path: Path) -> str:
    """A user's text file; a few undecodable bytes become U+FFFD, a binary file is refused."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror})") from None
    text = raw.decode("utf-8", errors="surrogateescape")
    bad = len(_NOT_TEXT.findall(text))
    if text and bad / len(text) > MAX_NOT_TEXT:
        if not _CONTROL.search(text):  # no control characters: text in a one-byte encoding, not binary
            raise DataError(
                f"--data {path}: {bad / len(text):.0%} of its bytes are not UTF-8, but it reads as text in a "
                f"one-byte encoding (Latin-1 or Windows-1252?): convert it, for example with "
                f"`iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`, and give that file"
            )
        raise DataError(
            f"--data {path}: {bad / len(text):.0%} of it is not text (bytes that are not UTF-8, or control "
            "characters): give UTF-8 text files, not binary ones"
        )
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def _user_text(path: Path) -> dict[str, Split]:
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder (give a text file, a folder of .txt files, or one of {', '.join(CORPORA)})")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    texts = [_read_text(f) for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"--data {path}: no text found" + (" (no non-empty .txt files)" if path.is_dir() else " (the file is empty)"))
    if len(texts) >= 2:
        n_eval = max(1, len(texts) // 10)
        train_docs, eval_docs = texts[:-n_eval], texts[-n_eval:]
    else:
        lines = texts[0].splitlines(keepends=True)
        if len(lines) < 2:
            raise DataError(f"--data {path}: need at least two lines to hold some out for evaluation")
        cut = len(lines) - max(1, len(lines) // 10)
        train_docs, eval_docs = ["".join(lines[:cut])], ["".join(lines[cut:])]
    return {
        "train": _split(f"{path}/train", "".join(train_docs), train_docs),
        "eval": _split(f"{path}/eval", "".join(eval_docs), eval_docs),
    }


def load_corpus(data: str, progress: bool = True) -> dict[str, Split]:
    """The splits of a corpus: "train" and "eval" always, "test" where the corpus has one."""
    if data == "wikitext2-mini":
        return {
            "train": _wikitext("wikitext2-mini/train (WikiText-2 valid)", _shipped("wiki.valid.raw.xz")),
            "eval": _wikitext("wikitext2-mini/eval (WikiText-2 test)", _shipped("wiki.test.raw.xz")),
        }
    if data == "wikitext2":
        train_file = fetch_archive_member(WIKITEXT2_TRAIN, cache_dir() / "wikitext-2" / "wiki.train.raw", progress)
        return {
            "train": _wikitext("wikitext2/train", train_file.read_text(encoding="utf-8")),
            "eval": _wikitext("wikitext2/valid", _shipped("wiki.valid.raw.xz")),
            "test": _wikitext("wikitext2/test", _shipped("wiki.test.raw.xz")),
        }
    return _user_text(Path(data))


# ---- token caches ------------------------------------------------------------------------------

_MAGIC = b"SFTOKENS"


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize(split: Split, tokenizer: BPETokenizer, cache: Path | None = None, progress: bool = True) -> np.ndarray:
    """The split's documents as one flat array of ids, each document followed by <|endoftext|>.

    With `cache`, the array is read from there when its header names this tokenizer and this
    source, and (re)written there atomically otherwise.
    """
    header = {"tokenizer": tokenizer.fingerprint(), "source_sha256": split.sha256, "dtype": _dtype_for(tokenizer.vocab_size).str}
    if cache is not None and cache.exists():
        tokens = _read_cache(cache, header)
        if tokens is not None:
            return tokens
    if tokenizer.eot_id is None:
        raise DataError("the tokenizer has no <|endoftext|> token to separate documents with")
    ids: list[int] = []
    for doc in tqdm(split.documents, desc=f"tokenizing {split.name}", unit="doc", disable=not progress or len(split.documents) < 50):
        ids += tokenizer.encode_ordinary(doc)
        ids.append(tokenizer.eot_id)
    tokens = np.asarray(ids, dtype=_dtype_for(tokenizer.vocab_size))
    if cache is not None:
        try:
            _write_cache(cache, header | {"count": len(tokens)}, tokens)
        except OSError as e:  # a read-only or full cache folder costs only time
            print(f"scratchformer: note: cannot write the token cache {cache} ({e.strerror or e}): the text is tokenized "
                  "again next time; set SCRATCHFORMER_CACHE to a writable folder to keep it", file=sys.stderr)
    return tokens


def _read_cache(path: Path, expected: dict) -> np.ndarray | None:
    try:
        f = open(path, "rb")
    except OSError:
        return None
    with f:
        if f.read(len(_MAGIC)) != _MAGIC:
            return None
        try:
            length = int.from_bytes(f.read(4), "little")
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return None
        if any(header.get(k) != v for k, v in expected.items()):
            return None  # another tokenizer or another source text: stale
        tokens = np.frombuffer(f.read(), dtype=np.dtype(header["dtype"]))
    return tokens if len(tokens) == header.get("count") else None


def _write_cache(path: Path, header: dict, tokens: np.ndarray) -> None:
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write(_MAGIC + len(raw).to_bytes(4, "little") + raw)
        tmp.write(tokens.tobytes())


def token_cache_path(data: str, split: str, tokenizer: BPETokenizer) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", data).strip("_")[-80:]
    return cache_dir() / "tokens" / f"{safe}-{split}-{tokenizer.fingerprint()}.bin"
