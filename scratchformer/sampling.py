"""Turning the model's next-token logits into text: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from typing import Iterator

import torch

from .config import Sampling
from .kv_cache import KVCache


def penalize_repetition(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of tokens in `previous` by `penalty`."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = logits.gather(-1, previous)
    return logits.scatter(-1, previous, torch.where(seen > 0, seen / penalty, seen * penalty))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside the k largest set to -inf (ties at the k-th value are kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the tokens ranked above it already reach p.
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, sampling: Sampling, previous: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token [B] from logits [B, vocab]."""
    logits = penalize_repetition(logits.float(), previous, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p is not None:
        logits = top_p_filter(logits, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    generator: torch.Generator | None = None,
    eos: int | None = None,
    padding: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of each sequence, [B], up to max_new_tokens times, continuing idx [B, T].

    Decodes with the KV cache: each step runs the model on the newest tokens only. When the
    context is full, the cache is rebuilt from the last three quarters of the context (a
    sliding window) and decoding goes on. A sequence that produced `eos` goes on producing it;
    decoding stops when every sequence has. GPT.generate is the front door to this; `model` is
    any module called as model(idx, cache) -> logits with a `config` (this module knows no model).
    `padding` [B]: how many filler tokens each sequence of idx starts with (prompts of different
    lengths, left-padded), passed to the model as `padding=`.
    """
    sampling.validate()
    context = model.config.context
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = idx.to(device)
    cache = KVCache(model.config, tokens.shape[0], device=device, dtype=next(model.parameters()).dtype)
    pad = {} if padding is None else {"padding": padding.to(device)}
    logits = model(tokens, cache, **pad)[:, -1]
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    try:
        for _ in range(max_new_tokens):
            token = next_token(logits, sampling, tokens, generator)
            if eos is not None:
                token = token.masked_fill(done, eos)
                done |= token == eos
            yield token
            if bool(done.all()):
                return
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            if cache.length == context:
                keep = tokens[:, -(3 * context // 4) :]
                if pad:  # the fillers dropped with the oldest tokens
                    pad["padding"] = (pad["padding"] - (tokens.shape[1] - keep.shape[1])).clamp(min=0)
                cache = KVCache(model.config, tokens.shape[0], device=device, dtype=cache.keys[0].dtype)
                logits = model(keep, cache, **pad)[:, -1]
            else:
                logits = model(token[:, None], cache, **pad)[:, -1]
    finally:
        model.train(was_training)
