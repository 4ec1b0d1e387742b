"""Training: Vaswani's schedule, label smoothing, AMP, DDP, evaluation, checkpoints.

One process: `scratchformer train ...`. Several GPUs: `torchrun --nproc_per_node N -m
scratchformer.cli train ...` (each process takes its share of every batch; rank 0 logs,
evaluates and saves).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import data as datamod
from . import ops
from .config import ModelConfig, TrainConfig
from .files import atomic_write
from .model import GPT
from .tokenizer import BPETokenizer

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"  # the model alone, beside the checkpoint, when safetensors is installed
FORMAT = "scratchformer-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, foreign, or from another model."""


class TrainingDiverged(RuntimeError):
    """The loss became inf or NaN."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the run can resume from."""


def vaswani_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), steps counted from 1."""
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), label_smoothing=label_smoothing, reduction=reduction
    )


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); one process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


def pick_device(name: str, option: str = "--device") -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda when a GPU is visible); under torchrun, cuda is the
    process's own GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise ValueError(f"{option} {name}: not a device here: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name}: no CUDA GPU is visible to torch (use {option} cpu)")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {name}: there are {torch.cuda.device_count()} GPUs (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


@torch.no_grad()
def evaluate(model: GPT, tokens: np.ndarray, words: int, device: torch.device, amp: str = "off", batch_size: int = 32,
             stride: int | None = None) -> dict:
    """Loss over every token of the split exactly once, with token- and word-level perplexity.
    `stride` < context slides overlapping windows (see `data.evaluation_windows`)."""
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    windows = list(datamod.evaluation_windows(tokens, model.config.context, stride))
    full = [w for w in windows if w[0].shape[1] == model.config.context]
    rest = [w for w in windows if w[0].shape[1] != model.config.context]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in rest]
    for group in groups:
        x = torch.cat([w[0] for w in group]).to(device)
        y = torch.cat([w[1] for w in group]).to(device)
        first = torch.tensor([w[2] for w in group], device=device)
        with autocast(device, amp):
            logits = model(x)
        nll = lm_loss(logits, y, reduction="none").view(y.shape)
        scored = torch.arange(y.shape[1], device=device)[None] >= first[:, None]
        total_nll += nll[scored].sum().item()
        count += int(scored.sum())
    model.train(was_training)
    loss = total_nll / count
    return {"loss": loss, "ppl": math.exp(loss), "word_ppl": math.exp(total_nll / max(words, 1)), "tokens": count}


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy on the eval split of token frequencies counted on the training split (add-one
    smoothed): the loss of a model that ignores context, which training must beat."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    return float(-np.log(counts[eval_tokens[1:]] / counts.sum()).mean())


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write through a temporary file and rename it over the old one, so a crash at any moment
    leaves either the previous checkpoint or the new one, never a broken file."""
    with atomic_write(path) as f:
        torch.save(payload, f)


def save_weights(path: Path, model: GPT, step: int, data: str) -> bool:
    """The model's weights as safetensors (config, step and corpus in its metadata), for tools
    that load weights without unpickling; False when the safetensors package is not installed."""
    try:
        from safetensors.torch import save
    except ImportError:
        return False
    metadata = {"format": FORMAT, "model_config": json.dumps(dataclasses.asdict(model.config)), "step": str(step), "data": data}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as f:
        f.write(save(tensors, metadata))
    return True


def resume_checkpoint(out: str | os.PathLike) -> dict:
    """The checkpoint a run in folder `out` resumes from."""
    if not (Path(out) / CHECKPOINT).exists():
        raise CheckpointError(f"{out}: no checkpoint there to resume (the run stopped before writing one): "
                              "start it again without --resume")
    return load_checkpoint(Path(out) / CHECKPOINT)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A run's checkpoint: a run folder, its checkpoint.pt, or its model.safetensors (weights,
    config and the tokenizer.json beside it; no optimizer state, so not for --resume)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        folder = path.parent if path.name == CHECKPOINT else None  # what else the folder holds
        hint = (" (a Hugging Face model folder: give it with --hf)" if folder and (folder / "config.json").exists() else
                f" (weights only: give {folder / WEIGHTS})" if folder and (folder / WEIGHTS).exists() else "")
        raise CheckpointError(f"{path}: no checkpoint there{hint}")
    if path.suffix == ".safetensors":
        return _load_weights(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for damaged files
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or damaged ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a scratchformer checkpoint")
    return payload


def _load_weights(path: Path) -> dict:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f'{path}: reading safetensors needs the safetensors package: pip install "scratchformer[hf]"') from None
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a scratchformer model (no scratchformer metadata)")
    tokenizer = path.parent / "tokenizer.json"
    if not tokenizer.exists():
        raise CheckpointError(f"{path}: no tokenizer.json beside it")
    try:
        vocabulary = json.loads(tokenizer.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{tokenizer}: not a readable tokenizer ({e}): put back the tokenizer.json "
                              "that was saved with the model") from None
    return {"format": FORMAT, "model": tensors, "model_config": json.loads(metadata["model_config"]),
            "step": int(metadata["step"]), "data": metadata["data"], "tokenizer": vocabulary}


def model_from_checkpoint(payload: dict) -> tuple[GPT, BPETokenizer]:
    model = GPT(ModelConfig(**payload["model_config"]))
    model.load_state_dict(payload["model"])
    return model, BPETokenizer.from_dict(payload["tokenizer"])


def check_backend(config: ModelConfig, device: torch.device, amp: str) -> None:
    """Run attention and LayerNorm once on tiny inputs of the model's shapes, so a backend that
    cannot run here (for example --kernels fused on a CPU) fails before any real work starts."""
    dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    q = torch.zeros(1, config.n_heads, 1, config.head_dim, device=device, dtype=dtype)
    kv = torch.zeros(1, config.kv_heads, 1, config.head_dim, device=device, dtype=dtype)
    ops.causal_attention(q, kv, kv)
    weight = torch.ones(config.d_model, device=device)
    ops.layer_norm(torch.zeros(1, config.d_model, device=device, dtype=dtype), weight, weight)


TOKENIZERS = ("bpe", "gpt2")


def build_tokenizer(kind: str, vocab_size: int, corpus: dict, out_dir: Path, progress: bool = True, save: bool = True) -> BPETokenizer:
    """GPT-2's vocabulary, or a BPE trained on the training split; saved as tokenizer.json (with
    `save`: on another node, where the run folder may not exist, training is deterministic, so
    every node arrives at the same tokenizer)."""
    saved = out_dir / "tokenizer.json"
    if kind == "gpt2":
        tokenizer = BPETokenizer.from_gpt2()
    elif saved.exists():
        return BPETokenizer.load(saved)
    else:
        tokenizer = BPETokenizer.train(corpus["train"].documents, vocab_size, progress=progress)
    if save:
        tokenizer.save(saved)
    return tokenizer


def data_name(data: str) -> str:
    """How a run records its corpus: a corpus name as it is, a path made absolute, so that a
    resume from another folder finds the same files."""
    return data if data in datamod.CORPORA else str(Path(data).resolve())


def check_out_dir(out: Path) -> None:
    """Fail before any work when the run folder cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder: choose a folder for the run")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder: choose a folder for the run")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable: choose a folder you can write to")


def plot_losses(csv_path: Path, png_path: Path, baseline: float | None = None) -> bool:
    """Train and eval loss against step as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = list(csv.DictReader(open(csv_path)))
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r["eval_loss"]]
    if train:
        ax.plot(*zip(*train), label="train (label-smoothed)", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


CSV_FIELDS = ["step", "train_loss", "lr", "tokens_per_s", "eval_loss", "eval_ppl", "eval_word_ppl"]


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
) -> RunResult:
    """Train a model on `data`; checkpoints, tokenizer, metrics.csv and loss.png go to out_dir.

    data and tokenizer None mean: a resumed run's own, else wikitext2-mini and a trained "bpe".
    A resumed run refuses a different corpus or tokenizer. `init_weights`, a state dict of a
    model of `model_config` (for example GPT-2's, see `GPT.from_hf`), starts a new run from them.
    """
    model_config.validate()
    train_config.validate()
    out = Path(out_dir)
    check_out_dir(out)
    if tokenizer is not None and tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, not {tokenizer!r}")
    dev = pick_device(device, option="device")
    check_backend(model_config, dev, train_config.amp)
    ckpt_path = out / CHECKPOINT
    payload = None
    if resume:
        payload = resume_checkpoint(out)
        saved = ModelConfig(**payload["model_config"])
        if saved != dataclasses.replace(model_config, vocab_size=saved.vocab_size):
            raise CheckpointError(
                f"{ckpt_path} holds a model with {_config_diff(saved, model_config)}: resume with the "
                "settings it was trained with, or train into another --out"
            )
        saved_data = data_name(payload["data"])
        if data is not None and data_name(data) != saved_data:
            raise CheckpointError(
                f"{out} was trained on {saved_data}, not {data}: resume without --data (it continues on "
                "its own corpus), or train into another --out"
            )
        saved_kind = payload.get("tokenizer_kind")
        if tokenizer is not None and saved_kind is not None and tokenizer != saved_kind:
            raise CheckpointError(
                f"{out} was trained with the {saved_kind} tokenizer, not {tokenizer}: resume without "
                "--tokenizer, or train into another --out"
            )
        data, tokenizer = saved_data, saved_kind
        step = payload["step"]
        if step >= train_config.steps:
            where = (f"is finished at step {step} of {step}" if step == train_config.steps
                     else f"is at step {step}, past the {train_config.steps} steps asked for")
            raise CheckpointError(f"{out} {where}: to train further, resume with --steps M, M more than {step}")
    elif ckpt_path.exists():
        raise CheckpointError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    data = data_name(data or "wikitext2-mini")
    if payload is None:
        tokenizer = tokenizer or "bpe"
    world = init_distributed(dev)
    micro = train_config.batch_size // train_config.grad_accum  # sequences per micro-batch, all ranks
    if micro % world.world:
        raise ValueError(f"batch_size / grad_accum ({micro}) must be divisible by the {world.world} processes: "
                         f"use a --batch-size that is a multiple of {train_config.grad_accum * world.world}")
    corpus = datamod.load_corpus(data, progress=world.main and progress)
    sources = {name: corpus[name].sha256 for name in ("train", "eval")}
    if payload is not None:  # checkpoints from before sources were recorded have none to compare
        changed = [name for name, digest in payload.get("sources", sources).items() if sources.get(name) != digest]
        if changed:
            raise CheckpointError(
                f"{data}: the {' and '.join(changed)} text changed since {out} was trained on it (SHA-256 differs): "
                "the run would continue on other data; restore the text, or start a new run in another --out"
            )
    if world.main:
        out.mkdir(parents=True, exist_ok=True)

    def prepare() -> tuple[BPETokenizer, dict]:
        if payload is not None:
            tok = BPETokenizer.from_dict(payload["tokenizer"])
        else:
            tok = build_tokenizer(tokenizer, model_config.vocab_size, corpus, out, progress and world.main, save=world.main)
        streams = {
            name: datamod.tokenize(corpus[name], tok, datamod.token_cache_path(data, name, tok), progress and world.main)
            for name in ("train", "eval")
        }
        return tok, streams

    # Rank 0 trains the tokenizer and fills the token caches; the others then read them.
    if world.main:
        tok, streams = prepare()
    if world.world > 1:
        dist.barrier()
        if not world.main:
            tok, streams = prepare()
    if init_weights is None:
        model_config = dataclasses.replace(model_config, vocab_size=tok.vocab_size).validate()
    elif tok.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the pretrained model only {model_config.vocab_size}")
    baseline = unigram_loss(streams["train"], streams["eval"], tok.vocab_size)

    torch.manual_seed(train_config.seed)
    model = GPT(model_config).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: vaswani_lr(i + 1, model_config.d_model, train_config.warmup, train_config.lr_scale)
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=train_config.amp == "fp16")
    sampler = torch.Generator().manual_seed(train_config.seed)  # the same on every rank: see below
    start_step = 0
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        schedule.load_state_dict(payload["schedule"])
        scaler.load_state_dict(payload["scaler"])
        sampler.set_state(payload["sampler"])
        _set_rng_state(payload["rng"])
        start_step = payload["step"]
    elif init_weights is not None:
        model.load_state_dict(init_weights)

    net, ddp = model, None
    if world.world > 1:
        net = ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if compile:
        net = torch.compile(net)

    csv_path = out / "metrics.csv"
    history = _read_history(csv_path, start_step) if world.main else []

    def write_history():
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(history)

    saved_step = start_step if payload is not None else None  # the step of the newest checkpoint

    def checkpoint(step: int):
        nonlocal saved_step
        save_checkpoint(ckpt_path, {
            "format": FORMAT, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "sampler": sampler.get_state(),
            "rng": _rng_state(), "model_config": dataclasses.asdict(model_config),
            "train_config": dataclasses.asdict(train_config), "tokenizer": tok.to_dict(), "tokenizer_kind": tokenizer,
            "data": data, "sources": sources,
        })
        save_weights(out / WEIGHTS, model, step, data)
        write_history()
        saved_step = step

    per_rank = micro // world.world
    ctx = model_config.context
    bar = tqdm(range(start_step, train_config.steps), initial=start_step, total=train_config.steps, desc="training", disable=not (world.main and progress), unit="step")
    final_eval = None
    model.train()
    done = start_step
    try:
        for step in bar:
            t0 = time.perf_counter()
            total = torch.zeros((), device=dev)
            for m in range(train_config.grad_accum):
                # Every rank draws the same global micro-batch and keeps its own slice: ranks see
                # different windows, and N processes train exactly like one with the whole batch.
                x, y = datamod.sample_windows(streams["train"], micro, ctx, sampler)
                x, y = x[world.rank * per_rank : (world.rank + 1) * per_rank].to(dev), y[world.rank * per_rank : (world.rank + 1) * per_rank].to(dev)
                last = m == train_config.grad_accum - 1
                sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
                with sync:
                    with autocast(dev, train_config.amp):
                        logits = net(x)
                    loss = lm_loss(logits, y, train_config.label_smoothing) / train_config.grad_accum
                    scaler.scale(loss).backward()
                total += loss.detach()
            if world.world > 1:
                dist.all_reduce(total)
                total /= world.world
            train_loss = total.item()
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    f"the loss became {train_loss} at step {step + 1}; weights were not updated"
                    + (f" and the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "")
                    + ": lower --lr-scale, raise --warmup, or use --amp bf16 instead of fp16"
                )
            scaler.unscale_(optimizer)
            if train_config.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.clip)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            done = step + 1
            tokens_per_s = train_config.batch_size * ctx / (time.perf_counter() - t0)
            if not world.main:
                continue
            row = {"step": done, "train_loss": f"{train_loss:.5f}", "lr": f"{lr:.3e}", "tokens_per_s": f"{tokens_per_s:.0f}", "eval_loss": "", "eval_ppl": "", "eval_word_ppl": ""}
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
            if done % train_config.eval_every == 0 or done == train_config.steps:
                final_eval = evaluate(model, streams["eval"], corpus["eval"].words, dev, train_config.amp)
                row.update(eval_loss=f"{final_eval['loss']:.5f}", eval_ppl=f"{final_eval['ppl']:.2f}", eval_word_ppl=f"{final_eval['word_ppl']:.2f}")
                bar.write(f"step {done}: eval loss {final_eval['loss']:.4f}, perplexity {final_eval['ppl']:.1f} per token, {final_eval['word_ppl']:.1f} per word")
            history.append(row)
            if done % train_config.checkpoint_every == 0 or done == train_config.steps:
                checkpoint(done)
    except KeyboardInterrupt:
        bar.close()
        where = (f"the last checkpoint is step {saved_step}, continue it with `scratchformer train --out {out} --resume`"
                 if saved_step is not None else f"no checkpoint was written yet (every {train_config.checkpoint_every} steps)")
        raise TrainingInterrupted(f"interrupted after step {done} of {train_config.steps}: {where}") from None
    bar.close()
    if world.main and history:
        write_history()
        plot_losses(csv_path, out / "loss.png", baseline)
    if world.world > 1:
        dist.barrier()
    numbers = [{k: (int(v) if k == "step" else float(v)) if v != "" else None for k, v in row.items()} for row in history]
    return RunResult(out, model, tok, numbers, final_eval, baseline)


def _read_history(csv_path: Path, upto: int) -> list[dict]:
    """Metrics already logged, up to the step a resumed run restarts from."""
    if upto == 0 or not csv_path.exists():
        return []
    return [r for r in csv.DictReader(open(csv_path)) if int(r["step"]) <= upto]


def _config_diff(a: ModelConfig, b: ModelConfig) -> str:
    diffs = [f"{f.name}={getattr(a, f.name)} (asked: {getattr(b, f.name)})" for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return ", ".join(diffs)
