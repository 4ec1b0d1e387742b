"""The `scratchformer` command: a whole run, and one clear line for each kind of bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from scratchformer import cli

SMALL = ["--n-layers", "1", "--d-model", "32", "--n-heads", "4", "--d-ff", "64", "--context", "16",
         "--vocab-size", "300", "--batch-size", "8", "--warmup", "5", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(small_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--data", str(small_text), "--out", str(out), "--steps", "12", "--eval-every", "6",
                     "--checkpoint-every", "6", "--sample-tokens", "8", *SMALL]) == 0
    return out


def test_train_writes_the_run_and_prints_a_sample(run, capsys):
    for name in ("checkpoint.pt", "metrics.csv", "loss.png", "tokenizer.json"):
        assert (run / name).exists(), name


def test_resume_continues_the_run(run, small_text, capsys):
    assert cli.main(["train", "--data", str(small_text), "--out", str(run), "--resume", "--steps", "14", "--sample-tokens", "0", "--no-progress"]) == 0
    lines = (run / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == [str(s) for s in range(1, 15)]


def test_eval_generate_and_tokenizer_commands(run, capsys):
    assert cli.main(["eval", "--checkpoint", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "per word" in out
    assert cli.main(["generate", "--checkpoint", str(run / "checkpoint.pt"), "--prompt", "The", "--max-new-tokens", "5",
                     "--seed", "1", "--device", "cpu"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("The")
    cli.main(["generate", "--checkpoint", str(run), "--prompt", "The", "--max-new-tokens", "5", "--seed", "1", "--device", "cpu"])
    assert capsys.readouterr().out == first  # the seed makes it reproducible
    assert cli.main(["tokenizer", "encode", "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["15496", "995"]
    assert cli.main(["tokenizer", "decode", "15496", "995"]) == 0
    assert capsys.readouterr().out == "Hello world\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "huge"], "unknown preset 'huge': choose one of seed, tiny"),
        (["train", "--data", "/no/such/corpus"], "--data /no/such/corpus: no such file or folder"),
        (["train", "--d-model", "30", "--n-heads", "4"], r"d_model \(30\) must be divisible by n_heads \(4\)"),
        (["train", "--n-heads", "4", "--n-kv-heads", "3"], r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
        (["train", "--steps", "0"], "steps must be at least 1"),
        (["train", "--kernels", "fused", "--device", "cpu", "--steps", "1"], "backend 'fused' cannot run"),
        (["eval", "--checkpoint", "/no/such/run"], "no checkpoint there"),
        (["tokenizer", "decode", "12", "x"], "decode takes integer token ids"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys, tmp_path, small_text):
    if args[0] == "train" and "--data" not in args:
        args = args + ["--data", str(small_text), "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"scratchformer {args[0]}: error:")
    assert pytest.importorskip("re").search(message, err), err


def test_prompt_longer_than_the_context_and_other_shapes(run, small_text, capsys):
    assert cli.main(["generate", "--checkpoint", str(run), "--prompt", "word " * 40, "--device", "cpu"]) == 1
    assert "more than the model's context of 16: shorten it" in capsys.readouterr().err
    good = (run / "checkpoint.pt").read_bytes()
    assert cli.main(["train", "--data", str(small_text), "--out", str(run), "--resume", "--d-model", "64", "--no-progress"]) == 1
    assert "holds a model with d_model=32 (asked: 64)" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(small_text), "--out", str(run), *SMALL]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == good


def test_console_script_error_has_no_traceback(tmp_path):
    script = Path(sys.executable).with_name("scratchformer")
    result = subprocess.run([str(script), "train", "--data", str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
