"""causal_attention: the model's attention op, on the backend of your choice.

The fused backend is `torch.ops.scratchformer.attention_fwd` / `attention_bwd`
(csrc/kernels/attention_*.cu), given fake implementations here so that
`torch.compile(fullgraph=True)` traces through them, and differentiated by `FusedAttention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _extensions
from . import reference
from .backend import choose

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUSED_HEAD_DIMS = (32, 64, 96, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what every backend computes
# The usual mistake behind a heads or time mismatch: the model's [B, T, H, D] passed as it is.
LAYOUT_HINT = " (did you pass [batch, time, heads, head_dim]? .transpose(1, 2) gives [batch, heads, time, head_dim])"


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> None:
    # Every backend refuses what not all of them compute alike (SDPA gives NaN for scale <= 0).
    if scale is not None and not 0 < scale < math.inf:
        raise ValueError(f"causal_attention: scale must be a positive number, got {scale} (default: head_dim ** -0.5)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"causal_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"causal_attention: {name} must be 4-D [batch, heads, time, head_dim], got shape {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise ValueError(f"causal_attention: q, k and v must be float16, bfloat16, float32 or float64, got {q.dtype} "
                         "(convert them with .to(torch.bfloat16), for example)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"causal_attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"causal_attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"causal_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (batch, n_heads, t_q, dim), (kv_batch, n_kv_heads, t_k, kv_dim) = q.shape, k.shape
    if dim == 0:
        raise ValueError(f"causal_attention: head_dim must be at least 1, got q of shape {tuple(q.shape)}")
    if batch != kv_batch or dim != kv_dim:
        raise ValueError(
            f"causal_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch and head_dim"
        )
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(
            f"causal_attention: the {n_heads} query heads must be a multiple of the {n_kv_heads} key/value heads"
            + LAYOUT_HINT
        )
    if not 1 <= t_q <= t_k:
        raise ValueError(
            f"causal_attention: need 1 <= query length <= key length, got {t_q} queries and {t_k} keys "
            "(queries are the last positions of the keys, as with a KV cache)" + LAYOUT_HINT
        )


def _fused_reason(q: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    if q.dtype not in FUSED_DTYPES:
        return f"the kernel takes float32, float16 or bfloat16, not {q.dtype}"
    if q.shape[-1] not in FUSED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one the kernel supports ({', '.join(map(str, FUSED_HEAD_DIMS))})"
    if q.shape[0] * q.shape[1] > 65535:
        return f"batch * heads = {q.shape[0] * q.shape[1]} is more than the kernel's grid takes (65535)"
    return None


def _torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    t_q, t_k = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # SDPA's is_causal aligns the mask top-left; a KV cache needs it bottom-right.
    visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)


class FusedAttention(torch.autograd.Function):
    """The kernels and their backward as one autograd node: apply(q, k, v, scale) -> (out, lse),
    both differentiable (a gradient reaching the log-sum-exp joins the backward). Its own Python
    rather than a torch.library autograd registration, which costs more host time per call."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.scratchformer.attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None and dlse is None:
            return None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.float().contiguous()
        dq, dk, dv = torch.ops.scratchformer.attention_bwd(dout, q, k, v, out, lse, dlse, ctx.scale)
        return dq, dk, dv, None


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention: q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D] -> [B, Hq, Tq, D].

    Hq % Hkv == 0 (multi-head, grouped-query or multi-query attention); the causal mask is
    aligned bottom-right (query i sees keys j <= i + Tk - Tq); scale defaults to D ** -0.5.
    `backend` picks the implementation for this call (default: `get_backend()`).
    """
    _check_inputs(q, k, v, scale)
    which = choose("causal_attention", backend, (q, k, v), lambda: _fused_reason(q), (q.dtype, q.shape[-1]))
    if which == "fused":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return FusedAttention.apply(q, k, v, scale)[0]
        return torch.ops.scratchformer.attention_fwd(q, k, v, scale)[0]  # nothing to differentiate: no autograd node
    if which == "torch":
        return _torch_sdpa(q, k, v, scale)
    return reference.causal_attention(q, k, v, scale)[0]


# ---- registration of the compiled ops with torch.library --------------------------------------

if _extensions.kernels is not None:

    @torch.library.register_fake("scratchformer::attention_fwd")
    def _fwd_fake(q, k, v, scale):
        batch, heads, t_q, dim = q.shape
        torch._check(k.shape == v.shape and k.shape[0] == batch and k.shape[3] == dim, lambda: "attention_fwd: bad k/v shape")
        return q.new_empty((batch, heads, t_q, dim)), q.new_empty((batch, heads, t_q), dtype=torch.float32)

    @torch.library.register_fake("scratchformer::attention_bwd")
    def _bwd_fake(dout, q, k, v, out, lse, dlse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
