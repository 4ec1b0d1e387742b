"""Model, training and sampling settings, and the named presets."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass


class ConfigError(ValueError):
    """Settings that do not fit together."""


def _check_types(config, whole: tuple, numbers_: tuple, flags: tuple) -> None:
    """Whole numbers where counts go (None allowed for optional ones), numbers, booleans."""
    for name in whole:
        value = getattr(config, name)
        if not (value is None or isinstance(value, numbers.Integral) and not isinstance(value, bool)):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
    for name in numbers_:
        value = getattr(config, name)
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
    for name in flags:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")


POSITIONS = ("sinusoidal", "rotary", "learned")
ACTIVATIONS = ("relu", "gelu_tanh", "swiglu")
NORMS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    context: int = 256  # longest sequence the model sees
    n_layers: int = 4
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: one per query head (MHA); 1: MQA; a divisor: GQA
    d_ff: int = 1024
    positions: str = "sinusoidal"  # or "rotary", or "learned" (GPT-2's position embedding)
    dropout: float = 0.0
    tie_embeddings: bool = False  # True: the output layer reuses the token embedding matrix
    # GPT-2's choices where the write-up's model differs:
    activation: str = "relu"  # or "gelu_tanh" (GPT-2's GELU, tanh approximation), or "swiglu" (Llama's gated feed-forward, no biases)
    bias: bool = False  # biases in the attention projections
    norm: str = "layernorm"  # or "rmsnorm" (Llama's: no mean subtracted, no bias)
    norm_eps: float = 1e-5  # the norms' epsilon
    scale_embeddings: bool = True  # token embeddings times sqrt(d_model) on the way in (Vaswani et al.)
    # The token that starts each document (<|endoftext|>): attention stops at it, so no position sees
    # an earlier document (a document mask). None: positions see everything before them.
    document_token: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> "ModelConfig":
        positive = ("vocab_size", "context", "n_layers", "d_model", "n_heads", "d_ff")
        _check_types(self, positive + ("n_kv_heads", "document_token"), ("dropout", "norm_eps"), ("tie_embeddings", "bias", "scale_embeddings"))
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}): "
                "pick a head count that divides it"
            )
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            raise ConfigError(
                f"n_kv_heads must be at least 1, got {self.n_kv_heads}: use 1 (multi-query), a divisor of "
                f"n_heads (grouped-query), or leave it out for multi-head attention"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads}): "
                "use 1 (multi-query), n_heads (multi-head) or a divisor of n_heads (grouped-query)"
            )
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}, not {self.norm!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head size, got {self.head_dim}")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.document_token is not None and not 0 <= self.document_token < self.vocab_size:
            raise ConfigError(f"document_token must be a token id in [0, {self.vocab_size}), got {self.document_token}")
        return self


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # sequences per optimizer step, over all processes and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step
    lr_scale: float = 1.0  # lr = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    warmup: int = 4000
    label_smoothing: float = 0.1
    clip: float = 1.0  # max gradient norm; 0 turns clipping off
    amp: str = "off"  # "off", "bf16" or "fp16" (autocast; fp16 adds a gradient scaler)
    eval_every: int = 500
    checkpoint_every: int = 500
    seed: int = 1337

    def validate(self) -> "TrainConfig":
        counts = ("steps", "batch_size", "grad_accum", "warmup", "eval_every", "checkpoint_every", "seed")
        _check_types(self, counts, ("lr_scale", "label_smoothing", "clip"), ())
        if not -(2**63) <= self.seed < 2**64:
            raise ConfigError(f"seed must be in [-2^63, 2^64) (torch's seed range), got {self.seed}")
        for name in ("steps", "batch_size", "grad_accum", "warmup", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ConfigError(f"amp must be off, bf16 or fp16, not {self.amp!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.lr_scale < math.inf:  # (NaN fails every comparison)
            raise ConfigError(f"lr_scale must be a finite number > 0, got {self.lr_scale}")
        if not 0 <= self.clip < math.inf:
            raise ConfigError(f"clip must be a finite number >= 0 (0: no clipping), got {self.clip}")
        return self


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0: greedy (always the most likely token); GPT.generate and the CLI default to this too
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text (CTRL)

    def validate(self) -> "Sampling":
        if not 0 <= self.temperature < math.inf:  # (NaN fails every comparison)
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        return self


# GPT-2 small (124M): the shape and choices of OpenAI's model, whose weights `--init-from gpt2` loads.
GPT2 = ModelConfig(vocab_size=50257, context=1024, n_layers=12, d_model=768, n_heads=12, d_ff=3072, positions="learned",
                   tie_embeddings=True, activation="gelu_tanh", bias=True, norm_eps=1e-5, scale_embeddings=False)

# The model of the original write-up, a small one that trains in minutes on a laptop CPU, and
# GPT-2 small with settings for fine-tuning it (peak learning rate about 1e-4, no label smoothing).
PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    "seed": (
        ModelConfig(context=256, n_layers=4, d_model=512, n_heads=8, d_ff=1024),
        TrainConfig(steps=10000, batch_size=64, warmup=4000, eval_every=500, checkpoint_every=500),
    ),
    "tiny": (
        ModelConfig(context=64, n_layers=2, d_model=128, n_heads=4, d_ff=512),
        TrainConfig(steps=300, batch_size=32, warmup=100, lr_scale=1.0, eval_every=100, checkpoint_every=100),
    ),
    # The seed's follow-ups as one switch: Llama's RMSNorm, SwiGLU, rotary positions, grouped-query
    # attention and no biases, at the seed model's size (d_ff 944 gives its parameter count).
    "llama": (
        ModelConfig(context=256, n_layers=4, d_model=512, n_heads=8, n_kv_heads=2, d_ff=944, positions="rotary",
                    activation="swiglu", norm="rmsnorm", norm_eps=1e-5, scale_embeddings=False),
        TrainConfig(steps=10000, batch_size=64, warmup=4000, eval_every=500, checkpoint_every=500),
    ),
    "gpt2": (
        GPT2,
        TrainConfig(steps=1000, batch_size=16, warmup=100, lr_scale=0.03, label_smoothing=0.0, eval_every=100,
                    checkpoint_every=100),
    ),
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def replace(config, **changes):
    """A copy of a config with the given fields changed (None values are ignored), validated."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(config, **changes).validate()
