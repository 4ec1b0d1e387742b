"""Evaluation: the loss over every token of a split, and the unigram baseline training must beat."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from .model import GPT
from .step import autocast
from .windows import evaluation_windows


@torch.no_grad()
def evaluate(model: GPT, tokens: np.ndarray, words: int, device: torch.device, amp: str = "off", batch_size: int = 32,
             stride: int | None = None, progress: bool = False) -> dict:
    """Loss over every token of the split exactly once, with token- and word-level perplexity.
    `stride` < context slides overlapping windows (see `windows.evaluation_windows`). `progress`
    shows a bar over the windows (below any bar already open, and gone when done)."""
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    windows = list(evaluation_windows(tokens, model.config.context, stride))
    full = [w for w in windows if w[0].shape[1] == model.config.context]
    rest = [w for w in windows if w[0].shape[1] != model.config.context]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in rest]
    bar = tqdm(total=len(windows), desc="evaluating", unit="window", leave=False, disable=not progress)
    for group in groups:
        x = torch.cat([w[0] for w in group]).to(device)
        y = torch.cat([w[1] for w in group]).to(device)
        first = torch.tensor([w[2] for w in group], device=device)
        with autocast(device, amp):
            nll = model(x, targets=y, reduction="none")
        scored = torch.arange(y.shape[1], device=device)[None] >= first[:, None]
        total_nll += nll[scored].sum().item()
        count += int(scored.sum())
        bar.update(len(group))
    bar.close()
    model.train(was_training)
    loss = total_nll / count
    return {"loss": loss, "ppl": perplexity(loss), "word_ppl": perplexity(total_nll / words) if words else None, "tokens": count}


def perplexity(mean_nll: float) -> float:
    """exp of a mean negative log-likelihood, inf where that overflows a float (a diverged model,
    or text of few "words", such as Chinese or Thai without spaces)."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def summary(result: dict, digits: int = 1) -> str:
    """"perplexity P per token, W per word" of an evaluate() result."""
    word_ppl = result["word_ppl"]
    per_word = f"{word_ppl:.{digits}f} per word" if word_ppl is not None else "no words to count per word"
    return f"perplexity {result['ppl']:.{digits}f} per token, {per_word}"


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy on the eval split of token frequencies counted on the training split (add-one
    smoothed): the loss of a model that ignores context, which training must beat."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    return float(-np.log(counts[eval_tokens[1:]] / counts.sum()).mean())
