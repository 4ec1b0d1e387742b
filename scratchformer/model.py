"""The GPT: token embeddings, positions, pre-norm Transformer blocks, LM head, generate() (on kv_cache.py and sampling.py).

Attention and LayerNorm go through `scratchformer.ops`, so the backend (fused CUDA kernels,
the from-scratch reference, or PyTorch's own) is a switch: `ops.set_backend(...)`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import ModelConfig
from .kv_cache import KVCache
from .sampling import Sampling, decode


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Vaswani et al.'s positions: sin on even, cos on odd channels, wavelengths 2pi..10000*2pi."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


def rotary_tables(length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim / 2] for rotary positions (Su et al.)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x [B, H, T, D] by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class LayerNorm(nn.Module):
    """nn.LayerNorm over the last dimension on `ops.layer_norm`; weight or bias may be None."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): one pass with the fused kernel."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Llama's norm on `ops.rms_norm`: x / rms(x) * weight, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    return (RMSNorm if config.norm == "rmsnorm" else LayerNorm)(config.d_model, config.norm_eps)


class SwiGLU(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x)), gate and up as one matmul, no biases."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.query = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=config.bias)
        self.key_value = nn.Linear(config.d_model, 2 * config.kv_heads * config.head_dim, bias=config.bias)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary, documents, cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, time, _ = x.shape
        q = self.query(x).view(batch, time, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.key_value(x).view(batch, time, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        y = ops.causal_attention(q, k, v, document_ids=documents)  # [B, H, T, head_dim]; K/V heads shared, never copied
        return self.dropout(self.out(y.transpose(1, 2).reshape(batch, time, -1)))


class Block(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attention = Attention(config)
        self.norm2 = make_norm(config)
        self.feed_forward = SwiGLU(config) if config.activation == "swiglu" else nn.Sequential(
            nn.Linear(config.d_model, config.d_ff),
            nn.ReLU() if config.activation == "relu" else nn.GELU(approximate="tanh"),
            nn.Linear(config.d_ff, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x, rotary, documents, cache, layer):
        # Under autocast the attention output is bf16/fp16 while the residual stream stays fp32:
        # casting it up is exactly what the addition would do.
        attended = self.attention(self.norm1(x), rotary, documents, cache, layer).to(x.dtype)
        normed, x = self.norm2.add_and_norm(attended, x)
        return x + self.feed_forward(normed)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.context, config.d_model)
        elif config.positions == "sinusoidal":
            self.register_buffer("position_table", sinusoidal_table(config.context, config.d_model), persistent=False)
        else:
            cos, sin = rotary_tables(config.context, config.head_dim)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # Embeddings at std d^-0.5, scaled up by sqrt(d) on the way in (Vaswani et al.), so tokens
        # enter at unit scale and tied output logits start near unit scale; unscaled (GPT-2), at
        # 0.02 and positions at 0.01. Linear layers at 0.02, the projections back into the residual
        # stream shrunk by depth (GPT-2).
        scaled = self.config.scale_embeddings
        nn.init.normal_(self.embedding.weight, std=self.config.d_model**-0.5 if scaled else 0.02)
        if self.config.positions == "learned":
            nn.init.normal_(self.position_embedding.weight, std=0.01)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2 and "embedding" not in name:
                residual = name.endswith(("attention.out.weight", "feed_forward.2.weight", "feed_forward.down.weight"))
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * self.config.n_layers) if residual else 1.0))
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, targets: torch.Tensor | None = None,
                label_smoothing: float = 0.0, reduction: str = "mean", padding: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T]. With a cache, idx continues the cached
        positions and its keys and values are added to the cache. With targets [B, T] (the next
        token at each position), the cross-entropy instead (mean, sum, or [B, T] with reduction
        "none"), from `ops.linear_cross_entropy`: the [B, T, vocab] logits are never held. With the
        config's `document_token`, each occurrence of it starts a document that sees nothing before it.
        `padding` [B] counts the filler tokens each sequence starts with (left padding, as for prompts of
        different lengths): no position reads them, and positions count from the first real token."""
        if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise ValueError(f"forward: idx must be integer token ids of shape [batch, time], got {idx.dtype} of shape "
                             f"{tuple(idx.shape)}" + (" (one sequence: idx[None])" if idx.dim() == 1 else ""))
        batch, time = idx.shape
        start = cache.length if cache is not None else 0
        if start + time > self.config.context:
            raise ValueError(
                f"{start + time} positions exceed the model's context of {self.config.context}"
            )
        x = self.embedding(idx)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.d_model)
        slots = torch.arange(start, start + time, device=idx.device)
        # Positions: the slots, or per sequence counted from its first real token.
        positions = slice(start, start + time) if padding is None else (slots[None] - padding[:, None]).clamp(min=0)
        rotary = None
        if self.config.positions == "learned":
            x = x + self.position_embedding.weight[positions]
        elif self.config.positions == "sinusoidal":
            x = x + self.position_table[positions]
        else:
            rotary = (self.rotary_cos[positions], self.rotary_sin[positions])
            if padding is not None:  # [B, T, D/2] -> [B, 1, T, D/2], beside the heads
                rotary = (rotary[0][:, None], rotary[1][:, None])
        x = self.dropout(x)
        documents = None
        if self.config.document_token is not None or padding is not None:
            # A document starts at each document token; each filler token is a document of its own.
            documents = (torch.zeros_like(idx) if self.config.document_token is None
                         else torch.cumsum(idx == self.config.document_token, dim=1))
            if padding is not None:
                documents = torch.where(slots[None] < padding[:, None], -1 - slots[None], documents)
            if cache is not None:
                documents = cache.add_documents(documents)
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, documents, cache, layer)
        if cache is not None:
            cache.length += time
        x = self.final_norm(x)
        head = self.embedding.weight if self.head is None else self.head.weight
        if targets is None:
            return F.linear(x, head)
        if targets.shape != idx.shape:
            raise ValueError(f"forward: targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        loss = ops.linear_cross_entropy(x.flatten(0, 1).to(head.dtype), head, targets.flatten(), label_smoothing=label_smoothing,
                                        reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = Sampling.temperature,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos: int | None = None,
        seed: int | None = None,
        streamer=None,
    ) -> torch.Tensor:
        """Continue prompts of token ids: idx is [T] or [B, T] (a tensor or lists), or a list of prompts
        of different lengths. Returns [B, T + new] (the prompts and what follows; [T + new] for a [T]
        prompt); prompts of different lengths come back left-aligned to the longest, each preceded by
        copies of its first token, which no position reads.

        temperature 0 is greedy; top_k, top_p (nucleus) and repetition_penalty (> 1 discourages
        tokens already in the text) filter the distribution first. With `eos`, a sequence ends at
        it (later positions repeat it) and generation stops when all have ended. `seed` makes the
        choices reproducible. `streamer(tokens)` is called with each step's new tokens [B], to
        show text as it comes. A prompt longer than the context keeps its last `context` tokens
        (with a warning), as nanoGPT and Hugging Face do.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        device = next(self.parameters()).device
        padding = None
        if isinstance(idx, (list, tuple)) and idx and all(isinstance(p, (list, tuple, torch.Tensor)) for p in idx) \
                and len({len(p) for p in idx}) > 1:
            if not all(len(p) for p in idx):
                raise ValueError("generate: every prompt needs at least one token (for example [eos])")
            # Left padding with each prompt's first token: the repetition penalty sees no new token.
            longest = max(len(p) for p in idx)
            padding = torch.tensor([longest - len(p) for p in idx], device=device)
            idx = [[int(p[0])] * (longest - len(p)) + [int(t) for t in p] for p in idx]
        try:
            tokens = torch.as_tensor(idx, device=device)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"generate: idx must be token ids: [T], [B, T], or a list of prompts ({e})") from None
        if tokens.numel() and (tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool):
            raise ValueError(f"generate: token ids must be integers, got {tokens.dtype} (a float id would be truncated)")
        tokens = tokens.long()
        if tokens.is_meta:
            raise ValueError("generate: the model's weights are on the meta device (shapes only): materialize them "
                             "(model.to_empty(device=...), then load_state_dict) before generating")
        if eos is not None and not 0 <= eos < self.config.vocab_size:
            raise ValueError(f"generate: eos must be a token id in [0, {self.config.vocab_size}), got {eos}")
        if seed is not None and not -(2**63) <= seed < 2**64:
            raise ValueError(f"generate: seed must be in [-2^63, 2^64), got {seed}")
        single = tokens.dim() == 1
        prompts = tokens[None] if single else tokens
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ValueError(f"generate: idx must be [T] or [B, T] with T >= 1 (for example [[eos]]), got shape {tuple(tokens.shape)}")
        if prompts.min() < 0 or prompts.max() >= self.config.vocab_size:
            raise ValueError(f"generate: token ids must be in [0, {self.config.vocab_size}), got {prompts.min()}..{prompts.max()}")
        context = self.config.context
        if prompts.shape[1] > context:
            warnings.warn(f"the prompt has {prompts.shape[1]} tokens, more than the model's context of {context}: "
                          f"generating from its last {context}", stacklevel=2)
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
        new = []
        if padding is not None:  # the fillers cut with a prompt's oldest tokens
            padding = (padding - max(prompts.shape[1] - context, 0)).clamp(min=0)
        for token in decode(self, prompts[:, -context:], max_new_tokens, sampling, generator, eos, padding):
            new.append(token)
            if streamer is not None:
                streamer(token)
        out = torch.cat([prompts] + [t[:, None] for t in new], dim=1)
        return out[0] if single else out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
