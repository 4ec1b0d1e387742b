"""A run's records: its checkpoint, weights file, metrics and loss plot, in the run folder.

    runs/NAME/checkpoint.pt       everything --resume needs (model, optimizer, sampler, RNG, settings, tokenizer)
    runs/NAME/model.safetensors   the weights alone, for tools that do not unpickle (with safetensors installed)
    runs/NAME/tokenizer.json      the tokenizer (tokenizer.py)
    runs/NAME/metrics.csv         one row per step: train loss, learning rate, throughput, evaluations
    runs/NAME/loss.png            train and eval loss against step

Every file is written through a temporary file renamed over the old one (files.atomic_write): a
crash at any moment leaves the previous version or the new one, never a broken file. The
checkpoint and the weights file carry a SHA-256 of their tensors, checked on load (pickle and
safetensors check nothing inside a tensor), and the fingerprint of the tokenizer they go with.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .files import atomic_write
from .model import GPT
from .tokenizer import BPETokenizer

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"  # the model alone, beside the checkpoint, when safetensors is installed
FORMAT = "scratchformer-checkpoint"
CSV_FIELDS = ["step", "train_loss", "lr", "tokens_per_s", "eval_loss", "eval_ppl", "eval_word_ppl"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, foreign, or from another model."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensors_sha256(obj) -> str:
    """SHA-256 of every tensor in a nested structure of dicts, lists and tuples, with the keys
    that lead to each and its dtype and shape, in the structure's order."""
    digest = hashlib.sha256()

    def walk(obj, where: str) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{where}:{t.dtype}:{tuple(obj.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().data)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{where}/{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{where}/{i}")

    walk(obj, "")
    return digest.hexdigest()


class _WriteErrors:
    """A file whose failed writes are remembered: torch.save reports a failed write as its own
    RuntimeError, without the OSError (such as a full disk) that caused it."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _write(path: Path, what: str, write) -> None:
    """Write `path` atomically with write(file); a failure is one CheckpointError naming the
    folder and the cause, and leaves the previous file as it was."""
    try:
        with atomic_write(path) as f:
            recorder = _WriteErrors(f)
            write(recorder)
    except (OSError, RuntimeError) as e:
        cause = recorder.error if isinstance(e, RuntimeError) and recorder.error is not None else e
        if not isinstance(cause, OSError):
            raise
        hint = ("free some space or write the run elsewhere (--out)" if cause.errno in (errno.ENOSPC, errno.EDQUOT)
                else "check the folder and its permissions")
        raise CheckpointError(f"{path.parent}: cannot write the {what} ({cause.strerror or cause}): {hint}; "
                              f"the previous {path.name} there, if any, is unchanged") from None


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write through a temporary file and rename it over the old one, so a crash at any moment
    leaves either the previous checkpoint or the new one, never a broken file. The payload
    gains "sha256", the digest of its tensors, checked by load_checkpoint."""
    payload = {**payload, "sha256": tensors_sha256(payload)}
    _write(Path(path), "checkpoint", lambda f: torch.save(payload, f))


def save_weights(path: Path, model: GPT, step: int, data: str, tokenizer: BPETokenizer) -> bool:
    """The model's weights as safetensors (config, step, corpus, the digest of the weights and the
    tokenizer's fingerprint and size in its metadata), for tools that load weights without
    unpickling; False when the safetensors package is not installed."""
    try:
        from safetensors.torch import save
    except ImportError:
        return False
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "model_config": json.dumps(dataclasses.asdict(model.config)), "step": str(step), "data": data,
                "sha256": tensors_sha256(dict(sorted(tensors.items()))), "tokenizer_sha256": tokenizer.fingerprint(),
                "tokenizer_size": str(tokenizer.vocab_size)}
    _write(Path(path), "weights file", lambda f: f.write(save(tensors, metadata)))
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
    stored = payload.pop("sha256", None)  # checkpoints from before digests were stored have none
    if stored is not None and tensors_sha256(payload) != stored:
        raise CheckpointError(_DAMAGED.format(path=path))
    return payload


_DAMAGED = ("{path}: damaged: its tensors do not match the SHA-256 stored with them (bytes changed on disk or in a copy): "
            "use another copy, or an earlier checkpoint")


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
    if "sha256" in metadata and tensors_sha256(dict(sorted(tensors.items()))) != metadata["sha256"]:
        raise CheckpointError(_DAMAGED.format(path=path))
    tokenizer = path.parent / "tokenizer.json"
    if not tokenizer.exists():
        raise CheckpointError(f"{path}: no tokenizer.json beside it")
    try:
        vocabulary = json.loads(tokenizer.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{tokenizer}: not a readable tokenizer ({e}): put back the tokenizer.json "
                              "that was saved with the model") from None
    return {"format": FORMAT, "model": tensors, "model_config": json.loads(metadata["model_config"]),
            "step": int(metadata["step"]), "data": metadata["data"], "tokenizer": vocabulary,
            "tokenizer_sha256": metadata.get("tokenizer_sha256"), "tokenizer_file": str(tokenizer)}


def model_from_checkpoint(payload: dict) -> tuple[GPT, BPETokenizer]:
    """The model and its tokenizer; refuses a tokenizer that is not the one the model was
    trained with (a tokenizer.json replaced beside model.safetensors)."""
    where = payload.get("tokenizer_file", "the checkpoint's tokenizer")
    tok = BPETokenizer.from_dict(payload["tokenizer"], where)
    config = ModelConfig(**payload["model_config"])
    recorded = payload.get("tokenizer_sha256")
    if (recorded is not None and tok.fingerprint() != recorded) or tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"{where}: not the tokenizer this model was trained with ({tok.vocab_size} tokens, the model's "
                              f"vocabulary has {config.vocab_size}{', and its fingerprint differs' if recorded else ''}): "
                              "put back the tokenizer.json saved with the model")
    model = GPT(config)
    model.load_state_dict(payload["model"])
    return model, tok


def plot_losses(csv_path: Path, png_path: Path, baseline: float | None = None) -> bool:
    """Train and eval loss against step as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
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


def read_history(csv_path: Path, upto: int) -> list[dict]:
    """Metrics already logged, up to the step a resumed run restarts from."""
    if upto == 0 or not csv_path.exists():
        return []
    with open(csv_path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def write_history(csv_path: Path, rows: list[dict]) -> None:
    with atomic_write(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
