"""The from-scratch PyTorch math that every scratchformer kernel is checked against.

Written out step by step (matmul, max, exp, sum; mean, variance) rather than calling PyTorch's
fused ops, so it is readable and independent of them. Statistics (softmax max/sum, LayerNorm
mean/variance) are kept in float32, or float64 for float64 inputs, as the kernels do.
Gradients come from PyTorch's autograd through this math.
"""

from __future__ import annotations

import torch


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def visible_keys(
    t_q: int, t_k: int, device: torch.device, document_ids: torch.Tensor | None = None, window: int | None = None
) -> torch.Tensor:
    """Which keys each query sees, as a boolean [B or 1, 1, Tq, Tk] mask.

    The Tq queries are the last Tq of the Tk positions (bottom-right alignment): query i sits at
    position p = i + Tk - Tq and sees keys j <= p; with `window` = left, only j >= p - left; with
    `document_ids` [B, Tk], only keys of its own document: a document is a run of equal ids, so j
    and p must lie in the same run (equal ids in separate runs are separate documents).
    """
    query_pos = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    key_pos = torch.arange(t_k, device=device)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible = visible & (key_pos >= query_pos - window)
    visible = visible[None, None]
    if document_ids is not None:
        runs = torch.zeros_like(document_ids, dtype=torch.long)  # which run each position is in
        runs[:, 1:] = torch.cumsum(document_ids[:, 1:] != document_ids[:, :-1], dim=1)
        visible = visible & (runs[:, None, t_k - t_q :, None] == runs[:, None, None, :])
    return visible


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention with grouped key/value heads.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] with Hq % Hkv == 0 and Tq <= Tk. Query head h reads
    kv head h // (Hq // Hkv) (Hkv == Hq: multi-head, 1: multi-query, else grouped-query).
    The mask is aligned bottom-right: the Tq queries are the last Tq positions of the Tk keys,
    so query i sees keys j <= i + (Tk - Tq), which is what decoding with a KV cache needs;
    `document_ids` and `window` narrow it further (see `visible_keys`). `softcap` caps each scaled
    score s at softcap * tanh(s / softcap) (Gemma 2); `sinks` [Hq] adds exp(sinks[h]) to each
    softmax denominator of head h, a logit attended to with a value of zero (gpt-oss).

    Returns the output [B, Hq, Tq, D] in q's dtype and the log-sum-exp of each query's scaled
    scores [B, Hq, Tq] (the sink included) in float32 (float64 for float64 inputs).
    """
    batch, n_heads, t_q, dim = q.shape
    n_kv_heads, t_k = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    scale = dim**-0.5 if scale is None else scale
    stat = _stat_dtype(q.dtype)

    # Group the query heads that share one kv head: [B, Hkv, group, Tq, D]. K and V gain a
    # broadcast dimension instead of being copied per query head.
    qg = (q * scale).reshape(batch, n_kv_heads, group, t_q, dim)
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)).to(stat)  # [B, Hkv, G, Tq, Tk]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visible_keys(t_q, t_k, q.device, document_ids, window)  # [B or 1, 1, Tq, Tk]
    scores = scores.masked_fill(~visible[:, :, None], float("-inf"))

    # Softmax, written out. Subtracting the row max keeps exp() in range; it cancels exactly in
    # both the output and the log-sum-exp, so it needs no gradient.
    row_max = scores.amax(dim=-1, keepdim=True)
    if sinks is not None:
        sink = sinks.to(stat).reshape(1, n_kv_heads, group, 1, 1)
        row_max = torch.maximum(row_max, sink)
    row_max = row_max.detach()
    weights = torch.exp(scores - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    if sinks is not None:
        row_sum = row_sum + torch.exp(sink - row_max)
    probs = (weights / row_sum).to(v.dtype)

    out = torch.matmul(probs, v.unsqueeze(2))  # [B, Hkv, G, Tq, D]
    lse = (row_max + torch.log(row_sum)).squeeze(-1)
    return out.reshape(batch, n_heads, t_q, dim), lse.reshape(batch, n_heads, t_q)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension.

    The variance is the biased one (divide by C). Returns y in x's dtype, and mean and
    rstd = 1 / sqrt(var + eps) shaped x.shape[:-1] in float32 (float64 for float64 inputs).
    """
    stat = _stat_dtype(x.dtype)
    xs = x.to(stat)
    mean = xs.mean(dim=-1, keepdim=True)
    centered = xs - mean
    var = (centered * centered).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = centered * rstd * weight.to(stat) + bias.to(stat)
    return y.to(x.dtype), mean.squeeze(-1), rstd.squeeze(-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension (no mean subtracted, no
    bias), computed in float32 (float64 for float64 inputs), returned in x's dtype."""
    xs = x.to(_stat_dtype(x.dtype))
    rstd = torch.rsqrt((xs * xs).mean(dim=-1, keepdim=True) + eps)
    return (xs * rstd * weight.to(xs.dtype)).to(x.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight.T + bias against targets, written out.

    hidden [N, d], weight [V, d], targets [N]. Logits are optionally capped (softcap *
    tanh(logits / softcap)); a row's loss is (1 - label_smoothing) * -log p(target) +
    label_smoothing * mean over the vocabulary of -log p; rows whose target is ignore_index count
    for nothing; "mean" divides the sum by the number of rows counted (nan when none are).
    """
    stat = _stat_dtype(hidden.dtype)
    logits = torch.matmul(hidden, weight.transpose(0, 1))
    if bias is not None:
        logits = logits + bias
    logits = logits.to(stat)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    log_probs = shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))
    counted = targets != ignore_index
    picked = log_probs.gather(1, torch.where(counted, targets, 0).long()[:, None])[:, 0]
    per_row = -(1 - label_smoothing) * picked - label_smoothing * log_probs.mean(dim=-1)
    per_row = torch.where(counted, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / counted.sum() if reduction == "mean" else total
