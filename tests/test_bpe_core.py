"""The C++ tokenizer core against tiktoken and against the pure-Python reference."""

import base64
import lzma
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchformer import _bpe, data
from scratchformer.bpe_reference import pretokenize
from scratchformer.tokenizer import EOT, BPETokenizer, TokenizerError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def gpt2():
    tok = BPETokenizer.from_gpt2()
    assert tok.core == "cpp"
    return tok


@pytest.fixture(scope="module")
def gpt2_python(gpt2):
    return BPETokenizer(gpt2.tokens, gpt2.merges, gpt2.special, core="python")


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """tiktoken's encoder built offline from the same vocabulary files, with GPT-2's pattern."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    assets = resources.files("scratchformer") / "assets" / "gpt2"
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("encoder.json", "vocab.bpe"):
            Path(tmp, name).write_bytes(lzma.open(assets / f"{name}.xz").read())
        ranks = data_gym_to_mergeable_bpe_ranks(f"{tmp}/vocab.bpe", f"{tmp}/encoder.json")
    return tiktoken.Encoding("gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})


def wikitext() -> str:
    return data._shipped("wiki.valid.raw.xz") + data._shipped("wiki.test.raw.xz")


def stdlib_sources(limit_bytes=8_000_000) -> list[str]:
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text)
        if size > limit_bytes:
            break
    return texts


def test_wikitext_ids_match_tiktoken_and_the_python_reference(gpt2, gpt2_python, tiktoken_gpt2):
    text = wikitext()
    ids = gpt2.encode_ordinary(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert ids == gpt2_python.encode_ordinary(text)
    assert gpt2.decode(ids) == text
    valid = data._shipped("wiki.valid.raw.xz")
    assert len(gpt2.encode_ordinary(valid)) == 249_887  # the count in the data's README


def test_python_standard_library_sources_match_tiktoken(gpt2, tiktoken_gpt2):
    texts = stdlib_sources()
    assert len(texts) > 100
    assert gpt2.encode_batch(texts, special="text") == tiktoken_gpt2.encode_ordinary_batch(texts)


assigned = st.characters(exclude_categories=("Cs", "Cn"))  # Cn: unassigned in our Unicode tables


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=assigned, max_size=200) | st.text(alphabet=" \t\n'sdtlvrema0123456789!.,ÀЖ中", max_size=200))
def test_arbitrary_text(gpt2, gpt2_python, tiktoken_gpt2, text):
    ids = gpt2.encode(text, special="text")
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert ids == gpt2_python.encode(text, special="text")
    assert gpt2.decode(ids) == text
    assert [p.decode() for p in _bpe.pretokenize(text)] == pretokenize(text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab ", min_size=65, max_size=2000))
def test_long_pieces_take_the_heap_path_with_the_same_result(gpt2, gpt2_python, text):
    assert gpt2.encode_ordinary(text) == gpt2_python.encode_ordinary(text)


@pytest.mark.parametrize("text", ["a" * 5000, " " * 5000, "7" * 3001, "\n" * 999 + "x", "ab" * 2000, "é" * 700])
def test_runs_of_one_character(gpt2, gpt2_python, tiktoken_gpt2, text):
    ids = gpt2.encode_ordinary(text)
    assert ids == gpt2_python.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)


def test_trained_vocabulary_matches_the_python_core():
    text = data._shipped("wiki.test.raw.xz")[:400_000]
    cpp = BPETokenizer.train([text], 3000, core="cpp")
    py = BPETokenizer.train([text], 3000, core="python")
    assert cpp.merges == py.merges and cpp.tokens == py.tokens and cpp.special == py.special
    sample = data._shipped("wiki.valid.raw.xz")[:200_000]
    assert cpp.encode_ordinary(sample) == BPETokenizer(cpp.tokens, cpp.merges, cpp.special, core="python").encode_ordinary(sample)


def test_any_vocabulary_size():
    text = wikitext()
    tok = BPETokenizer.train([text], 32_000)
    assert tok.vocab_size == 32_000 and len(tok.merges) == 32_000 - 257
    assert tok.decode(tok.encode_ordinary(text[:100_000])) == text[:100_000]


def test_encode_batch_on_threads_equals_one_by_one(gpt2):
    texts = data.wikitext_articles(wikitext())[:40]
    assert gpt2.encode_batch(texts, threads=4) == [gpt2.encode(t) for t in texts]
    with pytest.raises(TokenizerError, match="contains the special token"):
        gpt2.encode_batch(["fine", f"not {EOT} fine"])
    assert gpt2.encode_batch([f"a{EOT}"], special="allow") == [[64, 50256]]


def test_tiktoken_rank_file(gpt2, tmp_path):
    path = tmp_path / "gpt2.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(gpt2.tokens)))
    tok = BPETokenizer.from_tiktoken(path)
    assert tok.merges == gpt2.merges and tok.special == {EOT: 50256}
    path.write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(TokenizerError, match=r"gpt2.tiktoken:2: .*not-base64"):
        BPETokenizer.from_tiktoken(path)
    path.write_text("IQ== 0\nIg== 0\n")
    with pytest.raises(TokenizerError, match=r"gpt2.tiktoken:2: rank 0 appears twice"):
        BPETokenizer.from_tiktoken(path)


def test_inconsistent_vocabularies_are_rejected(gpt2):
    tokens = [bytes([b]) for b in range(256)] + [b"ab"]
    with pytest.raises(TokenizerError, match="merge 1 repeats merge 0"):
        BPETokenizer(tokens, [(97, 98), (97, 98)])
    with pytest.raises(TokenizerError, match="duplicate token bytes"):
        BPETokenizer(tokens + [b"ab"], [(97, 98)])
    with pytest.raises(ValueError, match="merge 0 makes a token not in the vocabulary"):
        _bpe.Encoder(tokens, [(98, 97)])
    with pytest.raises(ValueError, match="no token for byte 255"):
        _bpe.Encoder(tokens[:255] + [b"ab"], [])


def test_data_pipeline_gives_identical_ids_with_either_core(tmp_path):
    corpus = data.load_corpus("wikitext2-mini")
    cpp = BPETokenizer.train(corpus["train"].documents, 2000)
    py = BPETokenizer(cpp.tokens, cpp.merges, cpp.special, core="python")
    assert cpp.core == "cpp" and cpp.fingerprint() == py.fingerprint()
    a = data.tokenize(corpus["eval"], cpp, progress=False)
    b = data.tokenize(corpus["eval"], py, progress=False)
    assert a.dtype == np.uint16 and np.array_equal(a, b)


def test_unicode_tables_version_is_recorded():
    from scratchformer._unicode_tables import UNICODE_VERSION

    assert _bpe.unicode_version == UNICODE_VERSION and UNICODE_VERSION.count(".") == 2
    assert [p.decode() for p in _bpe.pretokenize("naïve Ωμέγα 42 ①")] == ["naïve", " Ωμέγα", " 42", " ①"]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abc", min_size=65, max_size=600))
def test_vocabulary_whose_ranks_do_not_grow_takes_the_heap_path(text):
    # "abc" merges before "ab" exists: the bucket shortcut's premise fails, the heap decides.
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b"ca", b"cab"]
    merges = [(256, 99), (97, 98), (99, 97), (258, 98)]
    cpp = BPETokenizer(tokens, merges, core="cpp")
    py = BPETokenizer(tokens, merges, core="python")
    assert cpp.encode_ordinary(text) == py.encode_ordinary(text)
