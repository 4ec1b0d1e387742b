"""The `scratchformer` command: a whole run, and one clear line for each kind of bad input."""

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scratchformer import cli
from scratchformer import step as stepmod
from scratchformer import training
from scratchformer.config import PRESETS, ModelConfig
from scratchformer.tokenizer import BPETokenizer
from scratchformer.records import load_checkpoint, save_checkpoint

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


def test_resume_continues_the_run_on_its_own_corpus(run, small_text, tmp_path, monkeypatch, capsys):
    assert load_checkpoint(run)["data"] == str(small_text.resolve())
    monkeypatch.chdir(tmp_path)  # from another folder, and without --data: the run knows its corpus
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "14", "--sample-tokens", "0", "--no-progress"]) == 0
    lines = (run / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == [str(s) for s in range(1, 15)]
    assert load_checkpoint(run)["data"] == str(small_text.resolve())


def test_run_files_get_the_mode_of_a_normal_write(run):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("checkpoint.pt", "tokenizer.json", "metrics.csv"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~mask, name


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(small_text, tmp_path, monkeypatch, capsys):
    real, calls = stepmod.forward_backward, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "forward_backward", interrupted)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(small_text), "--out", str(out), "--steps", "20", "--checkpoint-every", "4", *SMALL]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"scratchformer train: interrupted after step 9 of 20: the last checkpoint is step 8, continue it with "
                   f"`scratchformer train --out {out} --resume`")
    assert load_checkpoint(out)["step"] == 8


def test_gpt2_tokenizer_run_writes_tokenizer_json(small_text, tmp_path):
    out = tmp_path / "run"
    args = [a for a in SMALL if a not in ("--vocab-size", "300")]
    assert cli.main(["train", "--data", str(small_text), "--out", str(out), "--tokenizer", "gpt2", "--steps", "1", "--sample-tokens", "0", *args]) == 0
    saved, gpt2 = BPETokenizer.load(out / "tokenizer.json"), BPETokenizer.from_gpt2()
    assert saved.tokens == gpt2.tokens and saved.merges == gpt2.merges and saved.special == gpt2.special
    assert load_checkpoint(out)["model_config"]["vocab_size"] == 50257


def test_every_option_is_explained_with_the_presets_values():
    parser = cli._parser()
    commands = dict(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    tokenizer = next(a for a in commands["tokenizer"]._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in list(commands.items()) + [(f"tokenizer {k}", v) for k, v in tokenizer.items()]:
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, f"{name} {action.option_strings[0]} has no help"
    train_help = {a.dest: a.help for a in commands["train"]._actions}
    for _, option, _, _ in cli.PRESET_OPTIONS:
        field = option.replace("-", "_")
        which = 0 if hasattr(ModelConfig, field) else 1
        for preset in PRESETS:
            value = getattr(PRESETS[preset][which], field)
            assert f"{preset}: {'unset' if value is None else value}" in train_help[field], option


def test_generate_notes_a_prompt_that_ends_in_whitespace(run, capsys):
    assert cli.main(["generate", "--checkpoint", str(run), "--prompt", "The ", "--max-new-tokens", "3", "--seed", "1", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The ")
    assert captured.err.strip() == ("scratchformer generate: note: the prompt ends in whitespace, which often makes a worse "
                                    "continuation: leave the trailing space out")


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


def _snapshot(*folders: Path) -> dict:
    """Every file under the folders, with its bytes and mode: what a refused command must not change."""
    return {p: (p.read_bytes(), p.stat().st_mode) for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


# (command line, what the one line of error says). RUN stands for a finished run folder, TEXT for
# a small text file, BIN for a binary file, FILE for a plain file, OUT for a new folder, TMP for
# an existing one.
BAD_INPUT = [
    (["train", "--preset", "huge"], "unknown preset 'huge': choose one of seed, tiny, llama, gpt2"),
    (["train", "--init-from", "gpt2", "--n-layers", "2", "--tied"], "--n-layers, --tied: the model's shape comes from the pretrained weights"),
    (["train", "--init-from", "gpt2", "--out", "RUN", "--resume"], "--init-from starts a new run from pretrained weights, --resume continues"),
    (["train", "--init-from", "gpt2", "--tokenizer", "bpe"], "--init-from trains GPT-2's weights with GPT-2's tokenizer"),
    (["eval", "--hf", "gpt2", "--stride", "0"], "--stride must be at least 1, got 0"),
    (["eval", "--checkpoint", "RUN", "--stride", "1000"], "--stride 1000: at most the model's context, 16"),
    (["train", "--data", "/no/such/corpus", "--out", "OUT"], "--data /no/such/corpus: no such file or folder"),
    (["train", "--data", "BIN", "--out", "OUT"], r"model.bin: \d+% of it is not text"),
    (["train", "--d-model", "30", "--n-heads", "4"], r"--d-model \(30\) must be divisible by --n-heads \(4\)"),
    (["train", "--n-heads", "4", "--n-kv-heads", "3"], r"--n-heads \(4\) must be divisible by --n-kv-heads \(3\)"),
    (["train", "--n-kv-heads", "0"], "--n-kv-heads must be at least 1, got 0"),
    (["train", "--steps", "0"], "--steps must be at least 1"),
    (["train", "--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
    (["train", "--device", "banana"], "--device banana: not a device here: use cpu, cuda, cuda:N or auto"),
    (["train", "--device", "cuda"], "--device cuda: no CUDA GPU is visible"),
    (["train", "--out", "FILE"], "--out .*plain.txt: exists and is not a folder"),
    (["train", "--out", "FILE/run"], "--out .*plain.txt/run: .*plain.txt is a file, not a folder"),
    (["train", "--tokenizer", "gpt2", "--vocab-size", "500"], "--vocab-size sets the size of a trained BPE; GPT-2's vocabulary has 50257"),
    (["train", "--vocab-size", "100"], "--vocab-size must be at least 257"),
    (["train", "--sample-tokens", "-1"], "--sample-tokens must be 0 or more"),
    (["train", "--kernels", "fused", "--device", "cpu", "--steps", "1"], "--kernels fused cannot run: .* Use --kernels auto to fall back"),
    (["train", "--out", "RUN", "--resume"], r"is finished at step (\d+) of \1: to train further, resume with --steps M, M more than \1"),
    (["train", "--out", "RUN", "--resume", "--steps", "3"], r"is at step (\d+), past the 3 steps asked for: to train further, resume with --steps M, M more than \1"),
    (["train", "--out", "RUN", "--resume", "--steps", "20", "--data", "wikitext2-mini"], "was trained on .*small.txt, not wikitext2-mini: resume without --data"),
    (["train", "--out", "RUN", "--resume", "--steps", "20", "--tokenizer", "gpt2"], "was trained with the bpe tokenizer, not gpt2"),
    (["train", "--out", "RUN", "--resume", "--steps", "20", "--vocab-size", "500"], "holds a model with a vocabulary of 300, not 500"),
    (["train", "--out", "RUN", "--resume", "--steps", "20", "--d-model", "64"], r"holds a model with d_model=32 \(asked: 64\)"),
    (["train", "--out", "RUN", "--resume", "--steps", "20", "--preset", "seed"], "--preset seed: .* holds a model of other settings: resume without --preset"),
    (["train", "--out", "RUN"], "already holds a checkpoint"),
    (["train", "--out", "OUT", "--resume"], "no checkpoint there to resume .*: start it again without --resume"),
    (["eval", "--checkpoint", "TMP"], r"no checkpoint there \(weights only: give .*model.safetensors\)"),
    (["eval", "--checkpoint", "/no/such/run"], "no checkpoint there"),
    (["eval", "--checkpoint", "RUN", "--split", "test"], "--split test: .* has the splits train, eval"),
    (["generate", "--checkpoint", "RUN", "--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, got -3"),
    (["generate", "--checkpoint", "RUN", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["generate", "--checkpoint", "RUN", "--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["generate", "--checkpoint", "RUN", "--repetition-penalty", "inf"], "--repetition-penalty must be a finite number > 0"),
    (["train", "--lr-scale", "nan"], "--lr-scale must be a finite number > 0, got nan"),
    (["train", "--clip", "-1"], r"--clip must be a finite number >= 0 \(0: no clipping\), got -1"),
    (["train", "--d-model", "abc"], r"argument --d-model: invalid int value: 'abc' \(see scratchformer train --help\)"),
    (["train", "--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    (["train", "--out", "/proc/scratchformer-run"], "/proc/scratchformer-run: .*: check the path and its permissions"),
    (["generate", "--checkpoint", "RUN", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["generate", "--checkpoint", "RUN", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", "--checkpoint", "RUN", "--device", "banana"], "--device banana: not a device"),
    (["generate", "--checkpoint", "RUN", "--prompt", "hi", "--kernels", "fused", "--device", "cpu"], "--kernels fused cannot run: .* Use --kernels auto to fall back"),
    (["eval", "--checkpoint", "RUN", "--kernels", "fused", "--device", "cpu"], "--kernels fused cannot run: .* Use --kernels auto to fall back"),
    (["generate", "--checkpoint", "RUN", "--prompt", "caf\udce9"], "the value of --prompt is not valid UTF-8"),
    (["tokenizer", "train", "--out", "/nonexistent-dir/t.json"], "--out /nonexistent-dir/t.json: /nonexistent-dir is not an existing folder"),
    (["tokenizer", "train", "--out", "OUT/t.json", "--vocab-size", "10"], "--vocab-size must be at least 257"),
    (["tokenizer", "train", "--out", "TMP/t.json", "--data", "BIN"], r"model.bin: \d+% of it is not text"),
    (["tokenizer", "decode", "12", "x"], "decode takes integer token ids"),
    (["tokenizer", "encode", "--tokenizer", "/no/such.json", "hi"], "no such tokenizer file"),
    (["tokenizer", "encode", "--tokenizer", "TMP", "hi"], "a folder without a tokenizer.json: give a run folder or a tokenizer file"),
    (["train", "--stepz", "3"], r"unrecognized arguments: --stepz 3: did you mean --steps\? \(see scratchformer train --help\)"),
    (["tokenizer", "encode", "--tokenizr", "gpt2", "hi"], "tokenizer encode: error: unrecognized arguments: --tokenizr: did you mean --tokenizer"),
    (["train", "--seed", "99999999999999999999999"], r"--seed must be in \[-2\^63, 2\^64\)"),
    (["generate", "--checkpoint", "RUN", "--seed", "99999999999999999999999"], r"--seed must be in \[-2\^63, 2\^64\)"),
    (["eval", "--hf", "RUN"], "--hf .*: a scratchformer run folder, not a Hugging Face model: give it with --checkpoint"),
    (["train", "--init-from", "RUN"], "--init-from .*: a scratchformer run folder, not a Hugging Face model: continue it with --resume --out"),
    (["train", "--tokenizer", "/no/such.json"], "--tokenizer /no/such.json: not bpe, gpt2 or a tokenizer file"),
    (["train", "--tokenizer", "FILE"], "plain.txt: not a JSON tokenizer file"),
    (["train", "--tokenizer", "RUN/tokenizer.json", "--vocab-size", "500"], "--tokenizer .*tokenizer.json has its own: leave it out"),
    (["train", "--data", "TINY"], r"the training split has \d+ tokens, fewer than one window of 65 \(the context \+ 1\): "
                                  r"give more text \(--data\), or a shorter --context"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a)[:60] for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_changes_nothing(args, message, run, small_text, tmp_path, capsys):
    shutil.copy(run / "model.safetensors", tmp_path)  # TMP: a folder of weights alone
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder\n")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("A few words.\nAnd a line held out.\n")
    names = {"TINY": str(tiny), "RUN": str(run), "TEXT": str(small_text), "BIN": str(binary), "FILE": str(plain), "OUT": str(tmp_path / "out"), "TMP": str(tmp_path)}
    args = [next((a.replace(k, v, 1) for k, v in names.items() if a.startswith(k)), a) for a in args]
    if args[0] == "train":
        args += [a for a in ("--data", str(small_text)) if "--data" not in args and "--resume" not in args][:2]
        args += [] if "--out" in args else ["--out", str(tmp_path / "out")]
        args += ["--no-progress"]
    before = _snapshot(tmp_path, run)
    capsys.readouterr()
    assert cli.main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the error (generate used to print the prompt)
    assert len(captured.err.strip().splitlines()) == 1 and re.match(rf"scratchformer {args[0]}( \w+)?: error:", captured.err), captured.err
    assert re.search(message, captured.err), captured.err
    assert _snapshot(tmp_path, run) == before
    assert not (tmp_path / "out").exists()


def test_console_script_error_has_no_traceback(tmp_path):
    script = Path(sys.executable).with_name("scratchformer")
    result = subprocess.run([str(script), "train", "--data", str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    result = subprocess.run([str(script), "tokenizer", "encode", b"caf\xe9"], capture_output=True, text=True)  # Latin-1 bytes
    assert result.returncode == 1
    assert result.stderr == "scratchformer tokenizer: error: argument 'caf\ufffd' is not valid UTF-8: give text in UTF-8 (check the terminal's or the file's encoding)\n"


def test_generate_keeps_the_end_of_a_prompt_longer_than_the_context(run, capsys):
    assert cli.main(["generate", "--checkpoint", str(run), "--prompt", "word " * 39 + "word", "--max-new-tokens", "3",
                     "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("word " * 39 + "word")
    assert re.fullmatch(r"scratchformer generate: note: the prompt has \d\d+ tokens, more than the model's "
                        r"context of 16: generating from its last 16", captured.err.strip())


def test_a_damaged_tokenizer_beside_the_weights_is_named(run, tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(run / "model.safetensors", folder)
    (folder / "tokenizer.json").write_text('{"merges": [1,\n')
    assert cli.main(["generate", "--checkpoint", str(folder / "model.safetensors"), "--prompt", "hi", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith(f"scratchformer generate: error: {folder / 'tokenizer.json'}: not a readable tokenizer (")


def test_eval_names_the_run_s_corpus_when_it_has_moved(run, tmp_path, capsys):
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    payload = load_checkpoint(moved)
    payload["data"] = str(tmp_path / "gone.txt")
    save_checkpoint(moved / "checkpoint.pt", payload)
    assert cli.main(["eval", "--checkpoint", str(moved), "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip() == (f"scratchformer eval: error: the run's corpus {tmp_path / 'gone.txt'} is not "
                                               "there any more: give it (or another text) with --data")
