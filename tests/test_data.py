"""Corpora, article splitting, token caches, batches, and the download path (local server)."""

import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import random

import pytest
import torch

from scratchformer import data, windows
from scratchformer.tokenizer import EOT, BPETokenizer


def test_wikitext_articles_split_at_top_level_headings():
    text = " \n = First = \n \n Body one .\n \n = = Section = = \n More .\n = Second = \n Body two .\n"
    articles = data.wikitext_articles(text)
    assert len(articles) == 2
    assert articles[0].startswith(" \n = First = ") and " = = Section = = " in articles[0]
    assert articles[1] == " = Second = \n Body two .\n"
    assert "".join(articles) == text


def test_bundled_corpus_needs_no_network():
    corpus = data.load_corpus("wikitext2-mini")
    assert set(corpus) == {"train", "eval"}
    valid_articles = corpus["train"].documents
    assert len(valid_articles) > 50 and all(a.lstrip(" \n").startswith("= ") for a in valid_articles)
    assert corpus["train"].sha256 == "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"
    assert corpus["eval"].sha256 == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    assert corpus["eval"].words == len(data._shipped("wiki.test.raw.xz").split())


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(["the quick brown fox jumps over the lazy dog " * 10], 300)


def test_tokenize_joins_documents_with_end_of_text(tok):
    split = data._split("s", "ab", ["the fox", "the dog"])
    ids = data.tokenize(split, tok).tolist()
    eot = tok.special[EOT]
    assert ids == tok.encode("the fox") + [eot] + tok.encode("the dog") + [eot]


def test_token_cache_is_reused_and_rebuilt_when_stale(tok, tmp_path, monkeypatch):
    cache = tmp_path / "tokens.bin"
    split = data._split("s", "the lazy dog", ["the lazy dog"])
    first = data.tokenize(split, tok, cache)
    assert cache.exists()

    fox_ids = tok.encode("the lazy fox") + [tok.eot_id]
    calls = []
    real = tok.encode_ordinary
    monkeypatch.setattr(tok, "encode_ordinary", lambda t: calls.append(t) or real(t))
    assert np.array_equal(data.tokenize(split, tok, cache), first) and calls == []  # read back

    changed = data._split("s", "the lazy fox", ["the lazy fox"])  # another source text
    assert data.tokenize(changed, tok, cache).tolist() == fox_ids
    assert calls == ["the lazy fox"]

    other_tok = BPETokenizer.train(["jumps jumps over"], 260)  # another tokenizer
    assert data.tokenize(changed, other_tok, cache).tolist() == other_tok.encode("the lazy fox") + [other_tok.eot_id]

    cache.write_bytes(cache.read_bytes()[:-2])  # truncated
    assert data.tokenize(changed, other_tok, cache).tolist() == other_tok.encode("the lazy fox") + [other_tok.eot_id]
    cache.write_bytes(b"garbage")
    assert len(data.tokenize(changed, other_tok, cache)) == len(other_tok.encode("the lazy fox")) + 1


def test_training_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = windows.sample_windows(tokens, 64, 16, g)
    assert x.shape == y.shape == (64, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)
    assert len(set(x[:, 0].tolist())) > 40  # random positions
    assert x.min() >= 0 and y.max() <= 999
    with pytest.raises(data.DataError, match="fewer than one window"):
        windows.sample_windows(tokens[:10], 1, 16, g)


@pytest.mark.parametrize("stride", [None, 16, 8, 5, 1])
@pytest.mark.parametrize("length", [2, 17, 33, 100])
def test_evaluation_counts_every_token_once(length, stride):
    tokens = np.arange(length, dtype=np.uint16)
    cut = list(windows.evaluation_windows(tokens, 16, stride))
    targets = torch.cat([y[0, first:] for _, y, first in cut])
    assert targets.tolist() == list(range(1, length))
    for i, (x, y, first) in enumerate(cut):
        assert torch.equal(x[0, 1:], y[0, :-1]) and x.shape[1] <= 16
        if i:  # every scored token has at least context - stride tokens before it in its window
            assert first >= 16 - (stride or 16) - (16 - x.shape[1])
    with pytest.raises(ValueError, match="stride must be between 1 and the context"):
        list(windows.evaluation_windows(tokens, 16, 17))


def test_user_text_file_and_folder(tmp_path):
    with pytest.raises(data.DataError, match="no such file or folder"):
        data.load_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(data.DataError, match="the file is empty"):
        data.load_corpus(str(empty))
    (tmp_path / "docs").mkdir()
    with pytest.raises(data.DataError, match="no non-empty .txt files"):
        data.load_corpus(str(tmp_path / "docs"))
    for i in range(12):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(f"document {i}\n")
    corpus = data.load_corpus(str(tmp_path / "docs"))
    assert len(corpus["train"].documents) == 11 and corpus["eval"].documents == ["document 11\n"]
    single = tmp_path / "one.txt"
    single.write_text("".join(f"line {i}\n" for i in range(20)))
    corpus = data.load_corpus(str(single))
    assert corpus["eval"].documents == ["line 18\nline 19\n"] and corpus["eval"].words == 4


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SCRATCHFORMER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / "scratchformer"
    monkeypatch.setenv("SCRATCHFORMER_CACHE", str(tmp_path / "mine"))
    assert data.cache_dir() == tmp_path / "mine"


# ---- the download path, against a server on 127.0.0.1 ------------------------------------------


def make_archive(member: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(member, content)
    return buffer.getvalue()


@pytest.fixture
def server():
    """Serves `files` (name -> bytes) on 127.0.0.1; counts requests."""
    files, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files, hits
    httpd.shutdown()
    httpd.server_close()


def remote_for(base: str, archive: bytes, content: bytes, names=("corpus.zip",)) -> data.RemoteArchive:
    return data.RemoteArchive(
        urls=tuple(f"{base}/{n}" for n in names), size=len(archive), sha256=hashlib.sha256(archive).hexdigest(),
        member="corpus/train.raw", member_size=len(content), member_sha256=hashlib.sha256(content).hexdigest(),
    )


def test_download_verifies_and_extracts(server, tmp_path):
    base, files, hits = server
    content = " = Title = \n some training text .\n".encode() * 100
    files["corpus.zip"] = make_archive("corpus/train.raw", content)
    remote = remote_for(base, files["corpus.zip"], content)
    dest = tmp_path / "cache" / "train.raw"
    assert data.fetch_archive_member(remote, dest, progress=False) == dest
    assert dest.read_bytes() == content
    assert not list(dest.parent.glob("*.tmp"))  # no temporary file left behind
    data.fetch_archive_member(remote, dest, progress=False)
    assert len(hits) == 1  # a verified copy is not downloaded again


def test_corrupted_archive_is_rejected_and_the_next_source_used(server, tmp_path):
    base, files, hits = server
    content = b"good training text\n" * 50
    good = make_archive("corpus/train.raw", content)
    files["bad.zip"] = good[:-10] + b"0123456789"  # same size, different bytes
    files["corpus.zip"] = good
    remote = remote_for(base, good, content, names=("bad.zip", "corpus.zip"))
    dest = tmp_path / "train.raw"
    data.fetch_archive_member(remote, dest, progress=False)
    assert dest.read_bytes() == content and hits == ["/bad.zip", "/corpus.zip"]


def test_every_source_corrupt_or_missing_is_a_clear_error(server, tmp_path):
    base, files, _ = server
    content = b"text\n" * 10
    good = make_archive("corpus/train.raw", content)
    files["corpus.zip"] = good[: len(good) // 2]  # truncated
    remote = remote_for(base, good, content, names=("corpus.zip", "missing.zip"))
    dest = tmp_path / "train.raw"
    with pytest.raises(data.DataError) as e:
        data.fetch_archive_member(remote, dest, progress=False)
    message = str(e.value)
    assert "corpus.zip" in message and "expected" in message and "404" in message
    assert f"into {tmp_path} by hand" in message
    assert not dest.exists() and not list(tmp_path.glob("*.tmp")) and not (tmp_path / "corpus.zip").exists()


def test_an_archive_put_there_by_hand_is_used_offline(tmp_path):
    content = b"offline text\n" * 10
    archive = make_archive("corpus/train.raw", content)
    remote = remote_for("http://127.0.0.1:9", archive, content)  # nothing listens on port 9
    (tmp_path / "corpus.zip").write_bytes(archive)
    assert data.fetch_archive_member(remote, tmp_path / "train.raw", progress=False).read_bytes() == content


def test_archive_with_wrong_member_content(tmp_path):
    content = b"expected\n"
    archive = make_archive("corpus/train.raw", b"something else\n")
    remote = data.RemoteArchive(("http://127.0.0.1:9/corpus.zip",), len(archive), hashlib.sha256(archive).hexdigest(),
                                "corpus/train.raw", len(content), hashlib.sha256(content).hexdigest())
    (tmp_path / "corpus.zip").write_bytes(archive)
    with pytest.raises(data.DataError, match="does not match its published size and SHA-256"):
        data.fetch_archive_member(remote, tmp_path / "train.raw", progress=False)


def test_wikitext2_train_split_checksums_are_the_published_ones():
    r = data.WIKITEXT2_TRAIN
    assert (r.size, r.sha256) == (4_721_645, "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11")
    assert r.member_sha256 == "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57"
    assert Path(r.member).name == "wiki.train.raw" and all(u.endswith("wikitext-2-raw-v1.zip") for u in r.urls)


def test_binary_data_is_refused_and_a_few_bad_bytes_are_not(tmp_path):
    binary = tmp_path / "model.bin"
    rng = random.Random(0)
    binary.write_bytes(bytes(rng.randrange(256) for _ in range(20000)))
    with pytest.raises(data.DataError, match=r"model.bin: \d+% of it is not text .*give UTF-8 text files"):
        data.load_corpus(str(binary))
    zeros = tmp_path / "zeros.txt"
    zeros.write_bytes(b"\0" * 100 + b"words\n" * 50)
    with pytest.raises(data.DataError, match="zeros.txt: 25% of it is not text"):
        data.load_corpus(str(zeros))
    latin1 = tmp_path / "latin1.txt"  # a few characters in another encoding: kept, as U+FFFD
    latin1.write_bytes("café au lait\n".encode("latin-1") * 50)
    corpus = data.load_corpus(str(latin1))
    assert corpus["train"].documents[0].startswith("caf\ufffd au lait\n")


def test_wikitext_detokenize_undoes_wikitext_spacing_and_keeps_the_word_count():
    raw = " = = Early life = = \n He was born in 1 @,@ 000 @-@ year @-@ old town ( now Mill 's ) , on 3 @.@ 5 acres ; it was n't .\n"
    split = data._split("x", raw, [raw])
    out = data.wikitext_detokenize(split)
    assert out.documents == [" == Early life == \n He was born in 1,000-year-old town (now Mill's), on 3.5 acres; it wasn't.\n"]
    assert out.words == split.words == len(raw.split()) and out.sha256 != split.sha256


def test_text_in_latin1_is_refused_with_the_command_that_converts_it(tmp_path):
    latin1 = tmp_path / "notes.txt"
    latin1.write_bytes("Ça a été déjà vu à Orléans, où l'été est doré.\n".encode("latin-1") * 50)
    with pytest.raises(data.DataError, match=r"notes.txt: \d+% of its bytes are not UTF-8.*`iconv -f latin1 -t utf-8 .*notes.txt > notes.utf8.txt`"):
        data.load_corpus(str(latin1))
