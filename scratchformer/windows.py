"""Windows of a token stream: random ones for training, all of them in order for evaluation."""

from __future__ import annotations

import numpy as np
import torch

from .data import DataError


def sample_windows(tokens: np.ndarray, count: int, context: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` windows of context + 1 tokens at uniformly random positions: inputs [count, context]
    and next-token targets [count, context]."""
    if len(tokens) < context + 1:
        raise DataError(f"the training split has {len(tokens)} tokens, fewer than one window of {context + 1}: "
                        "give more text (--data), or a shorter --context")
    starts = torch.randint(0, len(tokens) - context, (count,), generator=generator).numpy()
    windows = torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def evaluation_windows(tokens: np.ndarray, context: int, stride: int | None = None):
    """Walk the split in order so that every token after the first is scored exactly once: windows
    of up to context + 1 tokens starting every `stride` tokens (default `context`: windows overlap
    by one). A stride below the context gives each scored token at least context - stride tokens
    before it. Yields (inputs [1, n], targets [1, n], first): targets before `first` were scored
    by an earlier window."""
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    scored = 0  # targets tokens[1 : scored + 1] are done
    for start in range(0, len(tokens) - 1, stride):
        window = torch.from_numpy(tokens[start : start + context + 1].astype(np.int64))[None]
        yield window[:, :-1], window[:, 1:], scored - start
        scored = start + window.shape[1] - 1
        if scored >= len(tokens) - 1:
            break
