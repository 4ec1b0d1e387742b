"""Training: schedule, reproducibility, kill-and-resume, DDP, divergence, checkpoints."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchformer import data as datamod
from scratchformer import ops
from scratchformer.config import ModelConfig, TrainConfig
from scratchformer.evaluation import evaluate, unigram_loss
from scratchformer.model import GPT
from scratchformer.records import CheckpointError, load_checkpoint
from scratchformer.step import TrainingDiverged, vaswani_lr
from scratchformer.training import train
from scratchformer.windows import evaluation_windows

MODEL = ModelConfig(vocab_size=320, context=16, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, dropout=0.1)
TRAIN = TrainConfig(steps=30, batch_size=8, warmup=10, eval_every=10, checkpoint_every=10, seed=3)

CHILD = """
import json, os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
from scratchformer.config import ModelConfig, TrainConfig
from scratchformer.training import train

model, train_config, data, out, kill_at = json.loads(sys.argv[1])
steps = [0]
def hook(optimizer, args, kwargs):
    steps[0] += 1
    if steps[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no chance to save or clean up
if kill_at:
    register_optimizer_step_post_hook(hook)
result = train(ModelConfig(**model), TrainConfig(**train_config), data, out, progress=False, device="cpu")
import torch
torch.save(result.model.state_dict(), os.path.join(out, f"rank{os.environ.get('RANK', '0')}.pt"))
"""


def child_args(model, train_config, data, out, kill_at=0):
    return json.dumps([dataclasses.asdict(model), dataclasses.asdict(train_config), str(data), str(out), kill_at])


def metrics(out: Path):
    with open(out / "metrics.csv") as f:
        return [(r["step"], r["train_loss"], r["eval_loss"]) for r in csv.DictReader(f)]


def test_vaswani_schedule():
    d, warmup = 512, 4000
    peak = vaswani_lr(warmup, d, warmup)
    assert peak == pytest.approx(d**-0.5 * warmup**-0.5)
    assert vaswani_lr(1000, d, warmup) == pytest.approx(peak * 1000 / warmup)  # linear warm-up
    assert vaswani_lr(16000, d, warmup) == pytest.approx(peak * 0.5)  # then 1/sqrt(step)
    assert max(vaswani_lr(s, d, warmup) for s in range(1, 20000, 7)) <= peak
    assert vaswani_lr(100, d, warmup, scale=2.0) == pytest.approx(2 * vaswani_lr(100, d, warmup))


def test_seeded_run_reproduces_its_loss_curve_exactly(small_text, tmp_path):
    a = train(MODEL, TRAIN, str(small_text), tmp_path / "a", progress=False, device="cpu")
    b = train(MODEL, TRAIN, str(small_text), tmp_path / "b", progress=False, device="cpu")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name
    losses = [float(r[2]) for r in metrics(tmp_path / "a") if r[2]]
    assert len(losses) == 3 and losses[-1] < losses[0] < math.log(a.tokenizer.vocab_size)
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "a" / "tokenizer.json").exists()
    assert a.final_eval["tokens"] > 0 and a.final_eval["word_ppl"] > a.final_eval["ppl"]
    # The history in numbers, the rows of metrics.csv: eval columns None between evaluations.
    assert [r["step"] for r in a.history] == list(range(1, TRAIN.steps + 1))
    assert [r["eval_loss"] for r in a.history if r["eval_loss"] is not None] == pytest.approx(losses, abs=1e-5)
    assert all(isinstance(r["train_loss"], float) and isinstance(r["lr"], float) for r in a.history)


def test_killed_run_resumes_to_the_same_weights(small_text, tmp_path):
    whole = train(MODEL, TRAIN, str(small_text), tmp_path / "whole", progress=False, device="cpu")
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", CHILD, child_args(MODEL, TRAIN, small_text, out, kill_at=15)])
    assert killed.returncode == -9
    assert load_checkpoint(out)["step"] == 10  # the last checkpoint before the kill
    resumed = train(MODEL, TRAIN, str(small_text), out, resume=True, progress=False, device="cpu")
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert metrics(out) == metrics(tmp_path / "whole")


def test_resume_refuses_a_corpus_whose_text_changed(small_text, tmp_path):
    corpus = tmp_path / "corpus.txt"
    text = small_text.read_text()
    corpus.write_text(text)
    train_config = dataclasses.replace(TRAIN, steps=2, eval_every=100)
    out = tmp_path / "run"
    train(MODEL, train_config, str(corpus), out, progress=False, device="cpu")
    good = (out / "checkpoint.pt").read_bytes()
    more = dataclasses.replace(train_config, steps=4)
    corpus.write_text(text.replace("the", "a", 1))  # in the first line: the train split
    with pytest.raises(CheckpointError, match="the train text changed since .* restore the text"):
        train(MODEL, more, None, out, resume=True, progress=False, device="cpu")
    assert (out / "checkpoint.pt").read_bytes() == good
    corpus.write_text(text)
    assert train(MODEL, more, None, out, resume=True, progress=False, device="cpu").history[-1]["step"] == 4
    # A checkpoint from before the sources were recorded resumes without the comparison.
    payload = load_checkpoint(out)
    del payload["sources"]
    torch.save(payload, out / "checkpoint.pt")
    corpus.write_text(text.replace("the", "a", 1))
    assert train(MODEL, dataclasses.replace(more, steps=5), None, out, resume=True, progress=False, device="cpu").history[-1]["step"] == 5


def test_data_parallel_matches_one_process_on_the_same_global_batch(small_text, tmp_path):
    model = dataclasses.replace(MODEL, dropout=0.0)
    train_config = dataclasses.replace(TRAIN, steps=6, eval_every=100, checkpoint_every=100)
    out = tmp_path / "ddp"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), child_args(model, train_config, small_text, out)]
    subprocess.run(cmd, check=True, env=env, timeout=600)
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    single = train(model, train_config, str(small_text), tmp_path / "single", progress=False, device="cpu")
    for name, tensor in single.model.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ in {name}"
        torch.testing.assert_close(rank0[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(rank0["embedding.weight"], GPT(single.model.config).embedding.weight)


def test_gradient_accumulation_matches_one_big_batch(small_text, tmp_path):
    model = dataclasses.replace(MODEL, dropout=0.0)
    one = dataclasses.replace(TRAIN, steps=3, eval_every=100, checkpoint_every=100)
    a = train(model, one, str(small_text), tmp_path / "a", progress=False, device="cpu")
    b = train(model, dataclasses.replace(one, grad_accum=4), str(small_text), tmp_path / "b", progress=False, device="cpu")
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_the_run_and_keeps_the_checkpoint(small_text, tmp_path, monkeypatch):
    real, calls = ops.linear_cross_entropy, []

    def exploding(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 13 else loss

    monkeypatch.setattr(ops, "linear_cross_entropy", exploding)
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 13; weights were not updated and the last good checkpoint is .*checkpoint.pt"):
        train(MODEL, dataclasses.replace(TRAIN, eval_every=100), str(small_text), tmp_path, progress=False, device="cpu")
    assert load_checkpoint(tmp_path)["step"] == 10


def test_checkpoint_errors(small_text, tmp_path):
    train_config = dataclasses.replace(TRAIN, steps=2, eval_every=100)
    train(MODEL, train_config, str(small_text), tmp_path, progress=False, device="cpu")
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a checkpoint: pass --resume"):
        train(MODEL, train_config, str(small_text), tmp_path, progress=False, device="cpu")
    with pytest.raises(CheckpointError, match=r"holds a model with d_model=32 \(asked: 64\)"):
        train(dataclasses.replace(MODEL, d_model=64), train_config, str(small_text), tmp_path, resume=True, progress=False, device="cpu")
    assert (tmp_path / "checkpoint.pt").read_bytes() == good  # untouched by the refusals

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a scratchformer checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        load_checkpoint(tmp_path / "nothing")


def test_evaluation_counts_every_token_once_and_word_perplexity(small_text):
    import numpy as np

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(MODEL, vocab_size=50)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, 1001).astype(np.uint16)
    result = evaluate(model, tokens, words=250, device=torch.device("cpu"), batch_size=7)
    assert result["tokens"] == 1000
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _, _ in evaluation_windows(tokens, 16)], dim=1)
    expected = torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(tokens[1:].astype(np.int64)))
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["word_ppl"] == pytest.approx(math.exp(result["loss"] * 1000 / 250), rel=1e-6)


def test_evaluation_with_stride_one_predicts_each_token_from_the_full_context_before_it():
    import numpy as np

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(MODEL, vocab_size=50)).eval()
    tokens = np.random.default_rng(1).integers(0, 50, 60).astype(np.uint16)
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():  # target i from the (up to) 16 tokens before it, one forward each
        nll = [torch.nn.functional.cross_entropy(model(ids[max(0, i - 16) : i][None])[0, -1], ids[i]) for i in range(1, 60)]
    result = evaluate(model, tokens, words=59, device=torch.device("cpu"), batch_size=5, stride=1)
    assert result["tokens"] == 59
    assert result["loss"] == pytest.approx(torch.stack(nll).mean().item(), rel=1e-5)
    strided = evaluate(model, tokens, words=59, device=torch.device("cpu"), stride=8)
    assert strided["tokens"] == 59 and strided["loss"] != pytest.approx(result["loss"], rel=1e-6)


def test_unigram_baseline():
    import numpy as np

    train_tokens = np.array([0, 0, 0, 1], dtype=np.uint16)  # counts +1: [4, 2, 1] of 7
    eval_tokens = np.array([2, 0, 1], dtype=np.uint16)  # targets 0 and 1
    expected = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert unigram_loss(train_tokens, eval_tokens, 3) == pytest.approx(expected)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(small_text, tmp_path, amp):
    config = dataclasses.replace(TRAIN, steps=4, eval_every=4, amp=amp)
    result = train(MODEL, config, str(small_text), tmp_path, progress=False, device="cpu")
    assert math.isfinite(result.final_eval["loss"]) and result.final_eval["loss"] < math.log(result.tokenizer.vocab_size) + 1
    assert load_checkpoint(tmp_path)["train_config"]["amp"] == amp


def test_a_run_and_its_resume_leave_no_file_open(small_text, tmp_path):
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        config = dataclasses.replace(TRAIN, steps=2, eval_every=2, checkpoint_every=2)
        train(MODEL, config, str(small_text), tmp_path, progress=False, device="cpu")
        train(MODEL, dataclasses.replace(config, steps=4), None, tmp_path, resume=True, progress=False, device="cpu")
        gc.collect()
    assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []


def test_perplexities_that_overflow_are_inf_and_text_without_words_says_so():
    from scratchformer.evaluation import perplexity, summary

    model = GPT(dataclasses.replace(MODEL, vocab_size=50)).eval()
    tokens = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0)).numpy()
    result = evaluate(model, tokens, words=0, device=torch.device("cpu"))
    assert result["word_ppl"] is None and "no words to count per word" in summary(result)
    assert perplexity(800.0) == math.inf and perplexity(2.0) == pytest.approx(math.exp(2.0))
    one_word = evaluate(model, tokens, words=1, device=torch.device("cpu"))  # 300 tokens' loss on one "word"
    assert one_word["word_ppl"] == math.inf and "inf per word" in summary(one_word)


def test_a_failed_evaluation_loses_no_checkpoint(small_text, tmp_path, monkeypatch):
    from scratchformer import training

    def failing(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(training, "evaluate", failing)
    config = dataclasses.replace(TRAIN, steps=4, eval_every=2, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        train(MODEL, config, str(small_text), tmp_path, progress=False, device="cpu")
    assert load_checkpoint(tmp_path)["step"] == 2  # written before the evaluation at step 2


def test_the_document_mask_is_on_for_several_documents_off_for_one_text_and_kept_on_resume(small_text, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    text = small_text.read_text(encoding="utf-8")
    part = len(text) // 4
    for i in range(4):  # four files: four documents, three of them for training
        (folder / f"{i}.txt").write_text(text[i * part : (i + 1) * part], encoding="utf-8")
    short = dataclasses.replace(TRAIN, steps=4, eval_every=2, checkpoint_every=2)
    several = train(MODEL, short, str(folder), tmp_path / "several", progress=False, device="cpu")
    assert several.model.config.document_token == several.tokenizer.eot_id is not None
    assert load_checkpoint(tmp_path / "several")["model_config"]["document_token"] == several.tokenizer.eot_id
    one = train(MODEL, short, str(small_text), tmp_path / "one", progress=False, device="cpu")
    assert one.model.config.document_token is None
    forced = train(MODEL, short, str(small_text), tmp_path / "forced", progress=False, device="cpu", document_mask=True)
    assert forced.model.config.document_token == forced.tokenizer.eot_id
    with pytest.raises(CheckpointError, match="was trained with the document mask"):
        train(MODEL, dataclasses.replace(short, steps=6), None, tmp_path / "several", resume=True, progress=False,
              device="cpu", document_mask=False)
    resumed = train(MODEL, dataclasses.replace(short, steps=6), None, tmp_path / "several", resume=True, progress=False, device="cpu")
    assert resumed.model.config.document_token == several.tokenizer.eot_id
