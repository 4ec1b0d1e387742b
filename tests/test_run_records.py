"""A run's files stay consistent: the tokenizer belongs to the run only with its checkpoint, weights
and tokenizer are checked against each other, damaged files and a full disk are one clear line,
and the text a run was trained on is checked where it is used again."""

import errno
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import scratchformer
from scratchformer import cli, records
from scratchformer.records import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from scratchformer.tokenizer import BPETokenizer

SMALL = ["--n-layers", "1", "--d-model", "32", "--n-heads", "4", "--d-ff", "64", "--context", "16",
         "--batch-size", "8", "--warmup", "5", "--device", "cpu", "--sample-tokens", "0"]


def train(out, data, *extra, progress=False) -> int:
    return cli.main(["train", "--data", str(data), "--out", str(out), *SMALL, *(() if progress else ("--no-progress",)), *extra])


@pytest.fixture(scope="module")
def run(small_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "run"
    assert train(out, small_text, "--steps", "4", "--checkpoint-every", "2", "--eval-every", "2", "--vocab-size", "300") == 0
    return out


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"scratchformer {command}: error: "), err
    return err.strip()


def test_a_new_run_trains_its_own_tokenizer_over_a_stale_one(small_text, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = BPETokenizer.train(["a b c"], 265)
    stale.save(out / "tokenizer.json")  # left by a run that failed before its first checkpoint
    assert train(out, small_text, "--steps", "2", "--vocab-size", "300") == 0
    tok = model_from_checkpoint(load_checkpoint(out))[1]
    assert tok.vocab_size == 300 and BPETokenizer.load(out / "tokenizer.json").fingerprint() == tok.fingerprint()


def test_a_run_refused_after_its_tokenizer_leaves_nothing(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Too short to train on.\nHeld out.\n")
    assert train(tmp_path / "run", text, "--steps", "2") == 1
    assert "give more text (--data), or a shorter --context" in one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_weights_beside_another_run_s_tokenizer_are_refused(run, small_text, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(run / "model.safetensors", folder)
    BPETokenizer.train(["other words entirely"] * 3, 290).save(folder / "tokenizer.json")
    for command in (["eval", "--data", str(small_text)], ["generate", "--prompt", "The"]):
        assert cli.main([command[0], "--checkpoint", str(folder / "model.safetensors"), *command[1:], "--device", "cpu"]) == 1
        line = one_error_line(capsys, command[0])
        assert f"{folder / 'tokenizer.json'}: not the tokenizer this model was trained with" in line
        assert capsys.readouterr().out == ""  # generate echoes no prompt before refusing


def test_a_tokenizer_larger_than_the_model_s_vocabulary_is_refused_without_a_fingerprint(run):
    payload = load_checkpoint(run / "model.safetensors")
    del payload["tokenizer_sha256"]  # as in weights files written before fingerprints were stored
    payload["tokenizer"] = BPETokenizer.from_gpt2().to_dict()
    with pytest.raises(CheckpointError, match="50257 tokens, the model's vocabulary has 300"):
        model_from_checkpoint(payload)


def flip_bytes_inside(path: Path, tensor: torch.Tensor, count: int = 400) -> None:
    """Flip `count` bytes of the file inside the stored bytes of `tensor`."""
    raw = bytearray(path.read_bytes())
    data = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()
    at = raw.find(data)
    assert at >= 0 and len(data) > count
    for i in range(at, at + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ["checkpoint.pt", "model.safetensors"])
def test_flipped_bytes_inside_a_tensor_are_found(run, tmp_path, name, capsys):
    copy = tmp_path / name
    shutil.copy(run / name, copy)
    shutil.copy(run / "tokenizer.json", tmp_path)
    flip_bytes_inside(copy, load_checkpoint(run)["model"]["embedding.weight"])
    with pytest.raises(CheckpointError, match=re.escape(f"{copy}: damaged: its tensors do not match the SHA-256")):
        load_checkpoint(copy)
    assert cli.main(["eval", "--checkpoint", str(copy), "--device", "cpu"]) == 1
    assert "damaged" in one_error_line(capsys, "eval")


def test_the_digest_covers_every_tensor_of_the_checkpoint(run, tmp_path):
    payload = load_checkpoint(run)
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    load_checkpoint(tmp_path / "checkpoint.pt")  # round trip: the digest matches
    optimizer_state = next(iter(payload["optimizer"]["state"].values()))["exp_avg"]
    flip_bytes_inside(tmp_path / "checkpoint.pt", optimizer_state, count=64)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = (out / "checkpoint.pt").read_bytes()
    real = tempfile.NamedTemporaryFile

    def filling(*args, **kwargs):
        f = real(*args, **kwargs)
        if Path(f.name).name.startswith("checkpoint.pt."):
            written = [0]

            def write(data):
                written[0] += len(data)
                if written[0] > 4096:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return f.file.write(data)

            f.write = write
        return f

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", filling)
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress", "--sample-tokens", "0"]) == 1
    line = one_error_line(capsys, "train")
    assert line == (f"scratchformer train: error: {out}: cannot write the checkpoint (No space left on device): free some "
                    "space or write the run elsewhere (--out); the previous checkpoint.pt there, if any, is unchanged")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob("*.tmp"))


def test_eval_refuses_a_corpus_that_changed_since_training(run, small_text, tmp_path, capsys):
    text = tmp_path / "text.txt"
    shutil.copy(small_text, text)
    out = tmp_path / "run"
    assert train(out, text, "--steps", "2", "--vocab-size", "280") == 0
    with open(text, "a") as f:
        f.write("A line added after training.\n")
    assert cli.main(["eval", "--checkpoint", str(out), "--device", "cpu", "--no-progress"]) == 1
    assert "changed since it was trained on it (the eval split's SHA-256 differs)" in one_error_line(capsys, "eval")
    assert cli.main(["eval", "--checkpoint", str(out), "--data", str(text), "--device", "cpu", "--no-progress"]) == 0
    text.unlink()
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "4", "--no-progress"]) == 1
    line = one_error_line(capsys, "train")
    assert f"was trained on {text}, which is not there any more: put the text back" in line and "--data" not in line


def test_a_tokenizer_file_trains_a_run_and_a_run_folder_encodes(small_text, tmp_path, capsys):
    tok_file = tmp_path / "tok.json"
    assert cli.main(["tokenizer", "train", "--data", str(small_text), "--out", str(tok_file), "--vocab-size", "280"]) == 0
    assert train(tmp_path / "run", small_text, "--steps", "2", "--tokenizer", str(tok_file)) == 0
    payload = load_checkpoint(tmp_path / "run")
    assert payload["tokenizer_sha256"] == BPETokenizer.load(tok_file).fingerprint()
    assert payload["tokenizer_kind"] == str(tok_file.resolve()) and payload["model_config"]["vocab_size"] == 280
    capsys.readouterr()
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "run"), "Hello"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in BPETokenizer.load(tok_file).encode("Hello")]


def test_a_vocabulary_smaller_than_asked_is_said(small_text, tmp_path, capsys):
    assert train(tmp_path / "run", small_text, "--steps", "1", "--vocab-size", "100000") == 0
    size = load_checkpoint(tmp_path / "run")["model_config"]["vocab_size"]
    assert f"note: the BPE has {size} tokens, not the 100000 asked for" in capsys.readouterr().err
    assert cli.main(["tokenizer", "train", "--data", str(small_text), "--out", str(tmp_path / "t.json"), "--vocab-size", "100000"]) == 0
    assert f"note: the BPE has {size} tokens, not the 100000 asked for" in capsys.readouterr().err


def test_eval_runs_without_a_writable_token_cache(run, small_text, tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder would be\n")  # (root writes anywhere: this blocks even root)
    monkeypatch.setenv("SCRATCHFORMER_CACHE", str(blocked))
    assert cli.main(["eval", "--checkpoint", str(run), "--data", str(small_text), "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "loss" in captured.out and "note: cannot write the token cache" in captured.err


def test_evaluation_has_its_own_bar_and_the_training_eta_leaves_it_out(small_text, tmp_path, monkeypatch, capsys):
    import time as real_time

    from scratchformer import training

    clock = [0.0]  # seconds each evaluation seems to take, on tqdm's clock
    monkeypatch.setattr("tqdm.std.time", lambda: real_time.time() + clock[0])
    evaluate = training.evaluate

    def slow_evaluate(*args, **kwargs):
        clock[0] += 1000.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", slow_evaluate)
    assert train(tmp_path / "run", small_text, "--steps", "4", "--eval-every", "2", "--vocab-size", "280", progress=True) == 0
    err = capsys.readouterr().err
    assert "evaluating:" in err
    elapsed = re.findall(r"training: 100%.*?\| 4/4 \[(\d+):(\d+)<", err)[-1]
    assert int(elapsed[0]) * 60 + int(elapsed[1]) < 1000  # the two evaluations' 2000 s are not training time


def test_eval_shows_progress_over_windows(run, small_text, capsys):
    assert cli.main(["eval", "--checkpoint", str(run), "--data", str(small_text), "--device", "cpu"]) == 0
    assert "evaluating:" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(run), "--data", str(small_text), "--device", "cpu", "--no-progress"]) == 0
    assert "evaluating" not in capsys.readouterr().err


def test_the_tokenizer_commands_do_not_import_torch():
    package_parent = Path(scratchformer.__file__).parent.parent  # the package these tests import, installed or in place
    code = ("import sys\nfrom scratchformer.cli import main\nassert main(['tokenizer', 'encode', 'Hello world']) == 0\n"
            "assert main(['tokenizer', 'decode', '15496']) == 0\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=package_parent, capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[-2] == "False", result.stdout


def test_version(capsys):
    from importlib import metadata

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"scratchformer {metadata.version('scratchformer')}\n"
