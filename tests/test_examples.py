"""Each script in examples/ runs as a user would run it, at toy size, on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(args, cwd, timeout=600):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_train_on_your_text(small_text, tmp_path):
    out = run([sys.executable, EXAMPLES / "train_on_your_text.py", small_text, "--steps", "6", "--vocab-size", "300",
               "--out", "run", "--device", "cpu"], tmp_path)
    loss, unigram = map(float, re.search(r"eval loss ([\d.]+) nats/token; a unigram model gets ([\d.]+)", out).groups())
    assert 0 < loss < 2 * unigram
    assert out.strip().splitlines()[-1].startswith("The")
    assert all((tmp_path / "run" / f).stat().st_size > 0 for f in ("checkpoint.pt", "tokenizer.json", "metrics.csv"))


def test_nanogpt_attention(tmp_path):
    out = run([sys.executable, EXAMPLES / "nanogpt_attention.py", "--steps", "12", "--device", "cpu"], tmp_path)
    output, gradient = map(float, re.search(r"output ([\d.e+-]+), gradient ([\d.e+-]+)", out).groups())
    assert output < 1e-5 and gradient < 1e-5
    losses = [float(x) for x in re.findall(r"loss ([\d.]+) nats/byte", out)]
    assert len(losses) == 5 and losses[-1] < losses[0]


def test_hf_model(tmp_path):
    pytest.importorskip("transformers")
    out = run([sys.executable, EXAMPLES / "hf_model.py", "--steps", "4", "--device", "cpu"], tmp_path)
    calls = re.search(r"attention calls: \{'scratchformer': (\d+), 'sdpa': (\d+)\}; fallbacks by reason: none", out)
    assert calls and int(calls.group(1)) > 0 and calls.group(2) == "0", out
    assert "step 4: loss" in out


def test_multi_gpu_on_two_cpu_processes(small_text, tmp_path):
    out = run(["bash", EXAMPLES / "multi_gpu.sh", "run", "--data", str(small_text), "--vocab-size", "300"], tmp_path)
    assert "+ 2 processes on cpu" in out and "sample:" in out
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_own_loop(small_text, tmp_path):
    """The loop of `step.py`'s docstring and the README, on the training API's parts."""
    out = run([sys.executable, EXAMPLES / "own_loop.py", small_text, "--steps", "40", "--out", "own.pt"], tmp_path)
    losses = [float(x) for x in re.findall(r"train loss ([\d.]+)", out)]
    loss, unigram = map(float, re.search(r"eval loss ([\d.]+) nats/token; a unigram model gets ([\d.]+)", out).groups())
    assert len(losses) == 4 and losses[-1] < losses[0] and loss < 1.5 * unigram
    from scratchformer.records import load_checkpoint, model_from_checkpoint

    model, tok = model_from_checkpoint(load_checkpoint(tmp_path / "own.pt"))  # what it saved loads as a run's would
    assert model.config.vocab_size == tok.vocab_size
