"""Training a model end to end: `train()`, which the `scratchformer train` command calls.

One process: `scratchformer train ...`. Several GPUs: `torchrun --nproc_per_node N -m
scratchformer.cli train ...` (each process takes its share of every batch; rank 0 logs,
evaluates and saves). The parts, each usable alone for a loop of your own:

    run.py         the device, the processes, the corpus and tokenizer (new, or a checkpoint's own)
    step.py        one optimizer step: schedule, Adam, label-smoothed loss, mixed precision
    evaluation.py  the loss over a split, and the unigram baseline
    records.py     the run folder: checkpoint, weights file, metrics.csv, loss.png
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import records, run
from .config import ModelConfig, TrainConfig
from .evaluation import evaluate, summary, unigram_loss
from .model import GPT
from .step import Optimization, TrainingDiverged, forward_backward, update
from .tokenizer import BPETokenizer, vocab_shortfall
from .windows import sample_windows


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the run can resume from."""


@dataclass
class RunResult:
    out_dir: Path
    model: GPT
    tokenizer: BPETokenizer
    history: list[dict]  # one row per step: step, train_loss, lr, tokens_per_s, eval_* (None between evaluations)
    final_eval: dict | None
    unigram_loss: float


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: str | None,
    out_dir: str | os.PathLike,
    tokenizer: str | None = None,
    device: str = "auto",
    resume: bool = False,
    compile: bool = False,
    progress: bool = True,
    init_weights: dict | None = None,
    document_mask: bool | None = None,
) -> RunResult:
    """Train a model on `data`; checkpoints, tokenizer, metrics.csv and loss.png go to out_dir.

    data and tokenizer None mean: a resumed run's own, else wikitext2-mini and a trained "bpe"
    (tokenizer may also be "gpt2" or the path of a tokenizer file).
    A resumed run refuses a different corpus or tokenizer. `init_weights`, a state dict of a
    model of `model_config` (for example GPT-2's, see `hf.from_hf`), starts a new run from them.
    `document_mask` stops attention at each <|endoftext|> (model_config.document_token); default:
    on where the training split holds several documents (a corpus, a folder of files), off for one
    text file; a resumed run keeps its own.
    """
    model_config.validate()
    train_config.validate()
    out = Path(out_dir)
    run.check_out_dir(out)
    dev = run.pick_device(device, option="device")
    run.check_backend(model_config, dev, train_config.amp)
    spec = run.resolve(model_config, train_config, data, tokenizer, out, resume)
    world = run.init_distributed(dev)
    micro = train_config.batch_size // train_config.grad_accum  # sequences per micro-batch, all ranks
    if micro % world.world:
        raise ValueError(f"batch_size / grad_accum ({micro}) must be divisible by the {world.world} processes: "
                         f"use a --batch-size that is a multiple of {train_config.grad_accum * world.world}")
    corpus, sources = run.load_corpus(spec, out, progress=world.main and progress)
    tok, streams = run.tokenize(spec, corpus, model_config.vocab_size, dev, world, progress)
    if len(streams["train"]) <= model_config.context:
        raise ValueError(f"the training split has {len(streams['train'])} tokens, fewer than one window of "
                         f"{model_config.context + 1} (the context + 1): give more text (--data), or a shorter --context")
    if spec.resumed is not None:
        token = spec.resumed["model_config"].get("document_token")
        if document_mask is not None and document_mask != (token is not None):
            raise records.CheckpointError(f"{out} was trained {'with' if token is not None else 'without'} the document mask: resume "
                                          "without --document-mask / --no-document-mask, or train into another --out")
    else:
        token = tok.eot_id if (len(corpus["train"].documents) > 1 if document_mask is None else document_mask) else None
    model_config = dataclasses.replace(model_config, document_token=token)
    if token is not None:
        run.check_backend(model_config, dev, train_config.amp)  # --kernels fused has no document mask yet
    if world.main:  # only now: a run refused above leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        if spec.resumed is None and spec.tokenizer == "bpe" and tok.vocab_size < model_config.vocab_size:
            print(f"scratchformer: note: {vocab_shortfall(tok, model_config.vocab_size, corpus['train'].name)}", file=sys.stderr)
    if init_weights is None:
        model_config = dataclasses.replace(model_config, vocab_size=tok.vocab_size).validate()
    elif tok.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the pretrained model only {model_config.vocab_size}")
    run_data = RunData(out, corpus, sources, tok, streams)
    trainer = Trainer.start(model_config, train_config, spec, run_data, dev, world, init_weights, compile)
    baseline = unigram_loss(streams["train"], streams["eval"], tok.vocab_size)
    final_eval = trainer.run(progress)
    if world.main and trainer.history:
        records.write_history(out / "metrics.csv", trainer.history)
        records.plot_losses(out / "metrics.csv", out / "loss.png", baseline)
    if world.world > 1:
        torch.distributed.barrier()
    numbers = [{k: (int(v) if k == "step" else float(v)) if v != "" else None for k, v in row.items()} for row in trainer.history]
    return RunResult(out, trainer.model, tok, numbers, final_eval, baseline)


@dataclass
class RunData:
    out: Path  # the run folder
    corpus: dict  # split name -> data.Split
    sources: dict  # split name -> SHA-256 of its text
    tok: BPETokenizer
    streams: dict[str, np.ndarray]  # split name -> tokens


@dataclass
class Trainer:
    """The state of a run between steps, and the loop: steps, evaluations, checkpoints."""

    model_config: ModelConfig
    train_config: TrainConfig
    spec: run.Spec
    data: RunData
    device: torch.device
    world: run.Distributed
    model: GPT
    net: torch.nn.Module  # the model as trained: wrapped for DDP and compiled where asked
    opt: Optimization
    sampler: torch.Generator  # the training windows' generator, the same on every rank
    step: int
    saved_step: int | None  # the step of the newest checkpoint
    history: list[dict] = dataclasses.field(default_factory=list)  # metrics.csv's rows (rank 0)

    @classmethod
    def start(cls, model_config, train_config, spec, data, dev, world, init_weights, compile) -> Trainer:
        """The model and optimizer at step 0, or as the resumed checkpoint left them."""
        torch.manual_seed(train_config.seed)
        model = GPT(model_config).to(dev)
        opt = Optimization.for_model(model, model_config, train_config, dev)
        sampler = torch.Generator().manual_seed(train_config.seed)
        payload, step = spec.resumed, 0
        if payload is not None:
            model.load_state_dict(payload["model"])
            opt.load_state_dict(payload)
            sampler.set_state(payload["sampler"])
            records.set_rng_state(payload["rng"])
            step = payload["step"]
        elif init_weights is not None:
            model.load_state_dict(init_weights)
        net = model
        if world.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if compile:
            net = torch.compile(net)
        return cls(model_config, train_config, spec, data, dev, world, model, net, opt, sampler, step,
                   step if payload is not None else None)

    def run(self, progress: bool) -> dict | None:
        """Train from the current step to the last; returns the last evaluation."""
        cfg, out = self.train_config, self.data.out
        self.history = records.read_history(out / "metrics.csv", self.step) if self.world.main else []
        bar = tqdm(initial=self.step, total=cfg.steps, desc="training", disable=not (self.world.main and progress), unit="step")
        final_eval = None
        self.model.train()
        try:
            while self.step < cfg.steps:
                row = self.train_step()
                bar.update(1)
                if not self.world.main:
                    continue
                done = self.step
                bar.set_postfix(loss=f"{float(row['train_loss']):.3f}", lr=f"{float(row['lr']):.2e}", tok_s=row["tokens_per_s"])
                self.history.append(row)
                # The checkpoint first: an evaluation that fails loses no training.
                saved = done % cfg.checkpoint_every == 0 or done == cfg.steps
                if saved:
                    self.checkpoint()
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    final_eval = evaluate(self.model, self.data.streams["eval"], self.data.corpus["eval"].words, self.device,
                                          cfg.amp, progress=not bar.disable)
                    bar.unpause()  # the rate and ETA are of training steps: the evaluation's time left out
                    word_ppl = final_eval["word_ppl"]
                    row.update(eval_loss=f"{final_eval['loss']:.5f}", eval_ppl=f"{final_eval['ppl']:.2f}",
                               eval_word_ppl=f"{word_ppl:.2f}" if word_ppl is not None else "")
                    bar.write(f"step {done}: eval loss {final_eval['loss']:.4f}, {summary(final_eval)}")
                    if saved:
                        records.write_history(out / "metrics.csv", self.history)
        except KeyboardInterrupt:
            bar.close()
            where = (f"the last checkpoint is step {self.saved_step}, continue it with `scratchformer train --out {out} --resume`"
                     if self.saved_step is not None else f"no checkpoint was written yet (every {cfg.checkpoint_every} steps)")
            raise TrainingInterrupted(f"interrupted after step {self.step} of {cfg.steps}: {where}") from None
        bar.close()
        return final_eval

    def train_step(self) -> dict:
        """One optimizer step on freshly sampled windows; returns its row of metrics.csv."""
        cfg, world = self.train_config, self.world
        t0 = time.perf_counter()
        micro = cfg.batch_size // cfg.grad_accum
        per_rank = micro // world.world
        batches = []
        for _ in range(cfg.grad_accum):
            # Every rank draws the same global micro-batch and keeps its own slice: ranks see
            # different windows, and N processes train exactly like one with the whole batch.
            x, y = sample_windows(self.data.streams["train"], micro, self.model_config.context, self.sampler)
            mine = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
            batches.append((x[mine].to(self.device), y[mine].to(self.device)))
        train_loss = forward_backward(self.net, batches, self.opt, cfg, self.device, world.world)
        if not math.isfinite(train_loss):
            checkpoint = self.data.out / records.CHECKPOINT
            raise TrainingDiverged(
                f"the loss became {train_loss} at step {self.step + 1}; weights were not updated"
                + (f" and the last good checkpoint is {checkpoint}" if checkpoint.exists() else "")
                + ": lower --lr-scale, raise --warmup, or use --amp bf16 instead of fp16"
            )
        lr = update(self.model, self.opt, cfg.clip)
        self.step += 1
        tokens_per_s = cfg.batch_size * self.model_config.context / (time.perf_counter() - t0)
        return {"step": self.step, "train_loss": f"{train_loss:.5f}", "lr": f"{lr:.3e}", "tokens_per_s": f"{tokens_per_s:.0f}",
                "eval_loss": "", "eval_ppl": "", "eval_word_ppl": ""}

    def checkpoint(self) -> None:
        """The checkpoint, the weights file, metrics.csv and (with a run's first checkpoint, which
        makes it the run's) tokenizer.json, at the current step."""
        out, tok = self.data.out, self.data.tok
        if self.saved_step is None or not (out / "tokenizer.json").exists():
            tok.save(out / "tokenizer.json")
        records.save_checkpoint(out / records.CHECKPOINT, {
            "format": records.FORMAT, "step": self.step, "model": self.model.state_dict(), **self.opt.state_dict(),
            "sampler": self.sampler.get_state(), "rng": records.rng_state(),
            "model_config": dataclasses.asdict(self.model_config), "train_config": dataclasses.asdict(self.train_config),
            "tokenizer": tok.to_dict(), "tokenizer_sha256": tok.fingerprint(), "tokenizer_kind": self.spec.tokenizer,
            "data": self.spec.data, "sources": self.data.sources,
        })
        records.save_weights(out / records.WEIGHTS, self.model, self.step, self.spec.data, tok)
        records.write_history(out / "metrics.csv", self.history)
        self.saved_step = self.step
