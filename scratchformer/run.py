"""A run's setting up: the device and processes, the run folder, and what it trains on (corpus,
tokenizer, token streams), from the options of a new run or the checkpoint it resumes, refusing
anything that would not match.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import data as datamod
from . import ops
from .config import ModelConfig, TrainConfig
from .records import CHECKPOINT, CheckpointError, resume_checkpoint
from .tokenizer import BPETokenizer


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


def check_backend(config: ModelConfig, device: torch.device, amp: str) -> None:
    """Run attention and LayerNorm once on tiny inputs of the model's shapes, so a backend that
    cannot run here (for example --kernels fused on a CPU) fails before any real work starts."""
    dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    q = torch.zeros(1, config.n_heads, 1, config.head_dim, device=device, dtype=dtype)
    kv = torch.zeros(1, config.kv_heads, 1, config.head_dim, device=device, dtype=dtype)
    documents = None if config.document_token is None else torch.zeros(1, 1, dtype=torch.long, device=device)
    ops.causal_attention(q, kv, kv, document_ids=documents)
    weight = torch.ones(config.d_model, device=device)
    ops.layer_norm(torch.zeros(1, config.d_model, device=device, dtype=dtype), weight, weight)


TOKENIZERS = ("bpe", "gpt2")  # or the path of a tokenizer file


def tokenizer_kind(tokenizer: str) -> str:
    """How a run records its tokenizer: bpe, gpt2, or a tokenizer file's absolute path."""
    if tokenizer in TOKENIZERS:
        return tokenizer
    if not Path(tokenizer).is_file():
        raise ValueError(f"--tokenizer {tokenizer}: not bpe, gpt2 or a tokenizer file (such as the tokenizer.json that "
                         "`scratchformer tokenizer train` writes)")
    BPETokenizer.load(tokenizer)  # a damaged file is refused before any work
    return str(Path(tokenizer).resolve())


def build_tokenizer(kind: str, vocab_size: int, corpus: dict, progress: bool = True) -> BPETokenizer:
    """GPT-2's vocabulary, a tokenizer file, or a BPE trained on the training split. A new run
    never takes the tokenizer.json in its folder: that belongs to the run once a checkpoint
    records it."""
    if kind == "gpt2":
        return BPETokenizer.from_gpt2()
    if kind != "bpe":
        return BPETokenizer.load(kind)
    return BPETokenizer.train(corpus["train"].documents, vocab_size, progress=progress)


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


@dataclass
class Spec:
    """What a run trains on: a corpus (name or absolute path), a tokenizer kind, and the
    checkpoint it resumes (None for a new run)."""

    data: str
    tokenizer: str
    resumed: dict | None


def resolve(model_config: ModelConfig, train_config: TrainConfig, data: str | None, tokenizer: str | None,
            out: Path, resume: bool) -> Spec:
    """The run's corpus and tokenizer: the options, or a resumed run's own (which the options may
    repeat but not change, nor the model's settings)."""
    if not resume:
        if (out / CHECKPOINT).exists():
            raise CheckpointError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
        return Spec(data_name(data or "wikitext2-mini"), tokenizer_kind(tokenizer or "bpe"), None)
    payload = resume_checkpoint(out)
    saved = ModelConfig(**payload["model_config"])
    if saved != dataclasses.replace(model_config, vocab_size=saved.vocab_size, document_token=saved.document_token):
        raise CheckpointError(
            f"{out / CHECKPOINT} holds a model with {_config_diff(saved, model_config)}: resume with the "
            "settings it was trained with, or train into another --out"
        )
    saved_data = data_name(payload["data"])
    if data is not None and data_name(data) != saved_data:
        raise CheckpointError(
            f"{out} was trained on {saved_data}, not {data}: resume without --data (it continues on "
            "its own corpus), or train into another --out"
        )
    saved_kind = payload.get("tokenizer_kind")
    if tokenizer is not None and saved_kind is not None and tokenizer_kind(tokenizer) != saved_kind:
        raise CheckpointError(
            f"{out} was trained with the {saved_kind} tokenizer, not {tokenizer}: resume without "
            "--tokenizer, or train into another --out"
        )
    step = payload["step"]
    if step >= train_config.steps:
        where = (f"is finished at step {step} of {step}" if step == train_config.steps
                 else f"is at step {step}, past the {train_config.steps} steps asked for")
        raise CheckpointError(f"{out} {where}: to train further, resume with --steps M, M more than {step}")
    return Spec(saved_data, saved_kind, payload)


def load_corpus(spec: Spec, out: Path, progress: bool) -> tuple[dict, dict]:
    """The corpus and the SHA-256 of its splits; a resumed run refuses text that changed."""
    if spec.resumed is not None and spec.data not in datamod.CORPORA and not Path(spec.data).exists():
        raise CheckpointError(f"{out} was trained on {spec.data}, which is not there any more: put the text back "
                              "(a resumed run continues on the same text), or start a new run in another --out")
    corpus = datamod.load_corpus(spec.data, progress=progress)
    sources = {name: corpus[name].sha256 for name in ("train", "eval")}
    if spec.resumed is not None:  # checkpoints from before sources were recorded have none to compare
        changed = [name for name, digest in spec.resumed.get("sources", sources).items() if sources.get(name) != digest]
        if changed:
            raise CheckpointError(
                f"{spec.data}: the {' and '.join(changed)} text changed since {out} was trained on it (SHA-256 differs): "
                "the run would continue on other data; restore the text, or start a new run in another --out"
            )
    return corpus, sources


def tokenize(spec: Spec, corpus: dict, vocab_size: int, device: torch.device, world: Distributed,
             progress: bool) -> tuple[BPETokenizer, dict[str, np.ndarray]]:
    """The tokenizer and the token stream of each split. Rank 0 makes the tokenizer and fills the
    token caches; the others receive it and then read them."""

    if spec.resumed is not None:
        tok = BPETokenizer.from_dict(spec.resumed["tokenizer"])
    else:
        tok = build_tokenizer(spec.tokenizer, vocab_size, corpus, progress) if world.main else None
        if world.world > 1:  # rank 0's, so that every process has the same
            shared = [tok.to_dict() if world.main else None]
            dist.broadcast_object_list(shared, src=0, device=device)
            tok = BPETokenizer.from_dict(shared[0])

    def streams() -> dict:
        return {name: datamod.tokenize(corpus[name], tok, datamod.token_cache_path(spec.data, name, tok), progress and world.main)
                for name in ("train", "eval")}

    if world.main:
        tokens = streams()
    if world.world > 1:
        dist.barrier()
        if not world.main:
            tokens = streams()
    return tok, tokens


def _config_diff(a: ModelConfig, b: ModelConfig) -> str:
    diffs = [f"{f.name}={getattr(a, f.name)} (asked: {getattr(b, f.name)})" for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return ", ".join(diffs)
