"""The pure-Python byte-level BPE: GPT-2's ids, round trips, training, files, special tokens."""

import lzma
import tempfile
from importlib import resources

import pytest

from scratchformer import data
from scratchformer.bpe_reference import pretokenize
from scratchformer.tokenizer import EOT, BPETokenizer, TokenizerError


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2()


TRICKY = [
    "Hello world",
    "  leading spaces and trailing   ",
    "I'm can't we've they'll he'd she's 'RE",
    "numbers 1234567 3.14 ①② ½ Ⅻ",
    "émigré naïve Ελληνικά русский 中文字符 한국어 العربية",
    "emoji 👍🏽 and zero-width\u200bjoiner \u00a0nbsp \u3000ideographic",
    "tabs\tand\nnewlines\r\n\n\n  x",
    "\x1c\x1d control separators \x85 next-line",
    "a" * 300 + " " + "7" * 50,
    "",
]


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """tiktoken's encoder on the same GPT-2 files (offline: no download of tiktoken's copy)."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    assets = resources.files("scratchformer") / "assets" / "gpt2"
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in ("encoder.json", "vocab.bpe"):
            paths[name] = f"{tmp}/{name}"
            with lzma.open(assets / f"{name}.xz") as src, open(paths[name], "wb") as dst:
                dst.write(src.read())
        ranks = data_gym_to_mergeable_bpe_ranks(paths["vocab.bpe"], paths["encoder.json"])
    return tiktoken.Encoding(
        "gpt2-local",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
    )


def test_gpt2_ids_match_tiktoken(gpt2, tiktoken_gpt2):
    text = data._shipped("wiki.valid.raw.xz")[:200_000]
    for sample in TRICKY + [text]:
        assert gpt2.encode_ordinary(sample) == tiktoken_gpt2.encode_ordinary(sample), sample[:40]


def test_gpt2_known_ids(gpt2):
    # From GPT-2's encoder.json: "Hello" = 15496, " world" = 995, <|endoftext|> = 50256.
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(EOT, special="allow") == [50256]
    assert gpt2.vocab_size == 50257 and len(gpt2.merges) == 50000


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text
    assert "".join(pretokenize(text)) == text


def test_pretokenizer_splits_like_gpt2():
    assert pretokenize("Hello, world!  It's 2024.\n\nOK") == [
        "Hello", ",", " world", "!", " ", " It", "'s", " 2024", ".", "\n", "\n", "OK",  # the last newline stands alone: \s+(?!\S)
    ]


def test_special_token_handling(gpt2):
    text = f"a{EOT}b"
    with pytest.raises(TokenizerError, match="contains the special token '<\\|endoftext\\|>' at character 1"):
        gpt2.encode(text)
    assert gpt2.encode(text, special="allow") == gpt2.encode("a") + [50256] + gpt2.encode("b")
    as_text = gpt2.encode(text, special="text")
    assert 50256 not in as_text and gpt2.decode(as_text) == text
    with pytest.raises(TokenizerError, match="special must be one of"):
        gpt2.encode(text, special="maybe")


def test_decode_of_a_cut_character(gpt2):
    ids = gpt2.encode("é")
    cut = gpt2.decode_bytes(ids)[:1]
    token = [i for i, b in enumerate(gpt2.tokens) if b == cut][0]
    assert gpt2.decode([token]) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        gpt2.decode([token], errors="strict")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        gpt2.decode([60000])


def test_training_on_a_hand_counted_corpus():
    # pieces: "ab" x1, " ab" x2, " cd" x1 -> (a,b) 3 times, then (" ", ab) twice, then the tie
    # of (" ", c) and (c, d) once each goes to the smaller left bytes, then (" c", d); then no pair
    # is left and training stops short of the size asked for.
    for core in ("python", "cpp"):
        tok = BPETokenizer.train(["ab ab ab cd"], vocab_size=300, core=core)
        assert [(tok.tokens[a], tok.tokens[b]) for a, b in tok.merges] == [(b"a", b"b"), (b" ", b"ab"), (b" ", b"c"), (b" c", b"d")]
        assert tok.special == {EOT: 260} and tok.vocab_size == 261
        assert tok.encode("ab ab cd") == [256, 257, 259]


def test_training_is_deterministic_and_reaches_the_size():
    text = data._shipped("wiki.test.raw.xz")[:100_000]
    a = BPETokenizer.train([text], 1000)
    b = BPETokenizer.train([text], 1000)
    assert a.merges == b.merges and a.vocab_size == 1000
    assert a.decode(a.encode_ordinary(text)) == text
    assert len(a.encode_ordinary(text)) < len(text.encode()) / 2.5  # it compresses


def test_save_and_load(tmp_path):
    tok = BPETokenizer.train(["the cat sat on the mat " * 20], 280)
    tok.save(tmp_path / "tok.json")
    again = BPETokenizer.load(tmp_path / "tok.json")
    assert again.merges == tok.merges and again.tokens == tok.tokens and again.special == tok.special
    assert again.fingerprint() == tok.fingerprint()


def test_bad_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json: not a JSON tokenizer file"):
        BPETokenizer.load(bad)
    bad.write_text('{"format": "other"}')
    with pytest.raises(TokenizerError, match="not a scratchformer tokenizer"):
        BPETokenizer.load(bad)
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        BPETokenizer.load(tmp_path / "missing.json")
    encoder = tmp_path / "encoder.json"
    with lzma.open(resources.files("scratchformer") / "assets/gpt2/encoder.json.xz", "rt") as f:
        encoder.write_text(f.read())
    merges = tmp_path / "vocab.bpe"
    merges.write_text("#version: 0.2\nĠ t\nĠt he he\n")
    with pytest.raises(TokenizerError, match="vocab.bpe:3: expected two tokens"):
        BPETokenizer.from_gpt2(encoder, merges)
    merges.write_text("#version: 0.2\nĠ t\nzzzq Ġt\n")
    with pytest.raises(TokenizerError, match="vocab.bpe:3: merge 'zzzq Ġt' refers to a token not in"):
        BPETokenizer.from_gpt2(encoder, merges)


def test_tiktoken_names(gpt2, tiktoken_gpt2):
    enc = tiktoken_gpt2
    assert gpt2.n_vocab == len(gpt2) == enc.n_vocab == 50257
    assert gpt2.eot_token == enc.eot_token == 50256
    for token_id in (0, 198, 995, 15496, 50255, 50256):
        token = gpt2.id_to_token(token_id)
        assert token == enc.decode_single_token_bytes(token_id)
        assert gpt2.token_to_id(token) == token_id
    assert gpt2.token_to_id(" world") == 995 and gpt2.token_to_id("<|endoftext|>") == 50256
    with pytest.raises(KeyError, match="not a single token"):
        gpt2.token_to_id(b" worldwide peace")
    with pytest.raises(KeyError, match="outside the vocabulary"):
        gpt2.id_to_token(50257)


@pytest.mark.parametrize("core", ["cpp", "python"])
@pytest.mark.parametrize("vocab_size", [1500, 100000])  # 1500: not a whole 1000 merges; 100000: runs out of pairs
def test_the_training_bar_ends_full_at_the_merges_made(monkeypatch, core, vocab_size):
    from scratchformer import tokenizer as tokenizer_module

    bars = []

    class Recording:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(tokenizer_module, "tqdm", Recording)
    texts = ["".join(chr(0x4e00 + (i * 7919 + j * 104729) % 3000) for j in range(60)) + f" word{i}" for i in range(300)]
    tok = BPETokenizer.train(texts, vocab_size, progress=True, core=core)
    merges = len(tok.merges)
    assert (merges == vocab_size - 257) == (vocab_size == 1500)
    assert bars[0].n == bars[0].total == merges and bars[0].closed
