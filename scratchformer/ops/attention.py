"""causal_attention: the model's attention op, on the backend of your choice.

The fused backend is `torch.ops.scratchformer.attention_fwd` / `attention_bwd`
(csrc/kernels/attention_*.cu), given fake implementations here so that
`torch.compile(fullgraph=True)` traces through them, and differentiated by `FusedAttention`.
"""

from __future__ import annotations

import math
import weakref

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


def _check_pattern(q, k, document_ids, window, softcap, sinks, op: str = "causal_attention") -> int | None:
    """Check the options that narrow or reshape the attention pattern; returns the window's left reach."""
    if document_ids is not None:
        if not isinstance(document_ids, torch.Tensor) or document_ids.dtype.is_floating_point or document_ids.dtype.is_complex \
                or document_ids.dtype == torch.bool:
            raise TypeError(f"{op}: document_ids must be an integer tensor [batch, key length], "
                            f"got {getattr(document_ids, 'dtype', type(document_ids).__name__)}")
        if document_ids.shape != (k.shape[0], k.shape[2]):
            raise ValueError(f"{op}: document_ids must be [batch, key length] = {[k.shape[0], k.shape[2]]}, "
                             f"got {list(document_ids.shape)}")
        if document_ids.device != q.device:
            raise ValueError(f"{op}: document_ids must be on q's device {q.device}, got {document_ids.device}")
    left = None
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
            raise TypeError(f"{op}: window must be (left, 0): query i sees keys i - left .. i; got {window!r}")
        left, right = window
        if left < 0 or right != 0:
            raise ValueError(f"{op}: window must be (left, 0) with left >= 0 (attention is causal: nothing to the right), "
                             f"got {tuple(window)}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < math.inf):
        raise ValueError(f"{op}: softcap must be a positive number (Gemma 2 uses 50.0), got {softcap!r}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point:
            raise TypeError(f"{op}: sinks must be a float tensor [query heads], got {getattr(sinks, 'dtype', type(sinks).__name__)}")
        if sinks.shape != (q.shape[1],):  # heads are dimension 1 of [B, H, T, D] and of varlen's [T, H, D]
            raise ValueError(f"{op}: sinks must be [query heads] = [{q.shape[1]}], got {list(sinks.shape)}")
        if sinks.device != q.device:
            raise ValueError(f"{op}: sinks must be on q's device {q.device}, got {sinks.device}")
    return left


def _fused_reason(q: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    if q.dtype not in FUSED_DTYPES:
        return f"the kernel takes float32, float16 or bfloat16, not {q.dtype}"
    if q.shape[-1] not in FUSED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one the kernel supports ({', '.join(map(str, FUSED_HEAD_DIMS))})"
    if q.shape[0] * q.shape[1] > 65535:
        return f"batch * heads = {q.shape[0] * q.shape[1]} is more than the kernel's grid takes (65535)"
    return None


def _torch_sdpa(q, k, v, scale, document_ids=None, window=None, softcap=None, sinks=None) -> torch.Tensor:
    """PyTorch's op: SDPA with the equivalent mask; softcapping, which no mask expresses, by PyTorch's
    softmax over the capped scores."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if t_q == t_k and document_ids is None and window is None and softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # SDPA's is_causal aligns the mask top-left; a KV cache needs it bottom-right.
    visible = reference.visible_keys(t_q, t_k, q.device, document_ids, window)  # [B or 1, 1, Tq, Tk]
    if softcap is not None:
        group = q.shape[1] // k.shape[1]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        stat = torch.promote_types(q.dtype, torch.float32)
        scores = softcap * torch.tanh(torch.matmul(q, kk.transpose(-1, -2)).to(stat) * scale / softcap)
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:  # the sink: one more logit, with a value of zero
            scores = torch.cat([scores, sinks.to(stat)[None, :, None, None].expand(*scores.shape[:-1], 1)], dim=-1)
            vv = torch.cat([vv, vv.new_zeros(*vv.shape[:2], 1, vv.shape[-1])], dim=2)
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), vv)
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
    # A sink is a key whose score is sinks[h] and whose value is zero: one more key, its score set by
    # an additive mask.
    bias = torch.zeros(visible.shape[0], q.shape[1], t_q, t_k + 1, dtype=q.dtype, device=q.device)
    bias[..., :t_k].masked_fill_(~visible, float("-inf"))
    bias = torch.cat([bias[..., :t_k], sinks.to(q.dtype)[None, :, None, None].expand(bias.shape[0], -1, t_q, 1)], dim=-1)
    k, v = (torch.cat([t, t.new_zeros(*t.shape[:2], 1, t.shape[-1])], dim=2) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)


def first_keys(t_q: int, t_k: int, document_ids: torch.Tensor | None, left: int | None,
               device: torch.device | None = None) -> torch.Tensor:
    """The pattern as the kernels take it: the first key each query sees, int32 [B, Tq] (B = 1 for
    a window alone, on `device`); query i then sees keys first[i] .. i + Tk - Tq. A document starts
    where document_ids changes, so its first key is the last such change at or before the query's
    position (a running max); a window's is the position minus `left`. Nondecreasing in i."""
    device = document_ids.device if document_ids is not None else device
    positions = torch.arange(t_k, device=device)
    first = torch.zeros(1, t_k, dtype=torch.long, device=device)
    if document_ids is not None:
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        first = torch.where(starts, positions, 0).cummax(dim=1).values
    if left is not None:
        first = torch.maximum(first, positions - left)
    return first[:, t_k - t_q :].to(torch.int32).contiguous()


# The last call's first keys: every layer of a forward passes the same document ids (or the same
# window alone), so the (several small) ops that derive them run once a forward, not once a layer.
_last_first_keys: tuple | None = None  # (weakref to document_ids or None, (its version, the other arguments), first keys)


def _kernel_first_keys(q: torch.Tensor, t_k: int, document_ids: torch.Tensor | None, left: int | None) -> torch.Tensor:
    """first_keys as the kernels read them: contiguous int32 [B, Tq] on q's device."""
    batch, t_q = q.shape[0], q.shape[2]
    global _last_first_keys
    # Not while compiling (the graph derives them), nor for inference tensors (no version counter).
    cacheable = not torch.compiler.is_compiling() and not (document_ids is not None and document_ids.is_inference())
    key = (document_ids._version if document_ids is not None else None, batch, t_q, t_k, left, q.device) if cacheable else None
    if cacheable and _last_first_keys is not None and _last_first_keys[1] == key:
        ref = _last_first_keys[0]
        if (ref() if ref is not None else None) is document_ids:
            return _last_first_keys[2]
    first = first_keys(t_q, t_k, document_ids, left, q.device).expand(batch, -1).contiguous()
    if cacheable:
        _last_first_keys = (weakref.ref(document_ids) if document_ids is not None else None, key, first)
    return first


def _float32(sinks: torch.Tensor | None) -> torch.Tensor | None:
    """The sinks as the kernels read them."""
    return sinks.float().contiguous() if sinks is not None else None


class FusedAttention(torch.autograd.Function):
    """The kernels and their backward as one autograd node: apply(q, k, v, first_key, sinks, softcap,
    scale) -> (out, lse), both differentiable (a gradient reaching the log-sum-exp joins the
    backward), and so are the sinks. Its own Python rather than a torch.library autograd
    registration, which costs more host time per call."""

    @staticmethod
    def forward(ctx, q, k, v, first_key, sinks, softcap, scale):
        sinks32 = _float32(sinks)
        out, lse = torch.ops.scratchformer.attention_fwd(q, k, v, first_key, sinks32, softcap, scale)
        ctx.save_for_backward(q, k, v, out, lse, first_key, sinks32)
        ctx.scale, ctx.softcap = scale, softcap
        ctx.sinks_dtype = sinks.dtype if sinks is not None else None
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None and dlse is None:
            return None, None, None, None, None, None, None
        q, k, v, out, lse, first_key, sinks = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.float().contiguous()
        dq, dk, dv = torch.ops.scratchformer.attention_bwd(dout, q, k, v, out, lse, dlse, first_key, ctx.softcap, ctx.scale)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[4]:
            # A sink is a key of value zero with probability exp(sink - lse): d sink = -sum over queries
            # of that probability times delta = rowsum(dout * out) - dlse (the kernels' delta).
            delta = (dout.float() * out.float()).sum(-1)
            if dlse is not None:
                delta = delta - dlse
            dsinks = -(torch.exp(sinks[None, :, None] - lse) * delta).sum((0, 2)).to(ctx.sinks_dtype)
        return dq, dk, dv, None, dsinks, None, None


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention: q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D] -> [B, Hq, Tq, D].

    Hq % Hkv == 0 (multi-head, grouped-query or multi-query attention); the causal mask is
    aligned bottom-right (query i sees keys j <= i + Tk - Tq); scale defaults to D ** -0.5.
    Optional, in any combination: `document_ids` [B, Tk] (integers; a document is a run of equal
    ids, e.g. a running count of separator tokens, and a query sees only keys of its own: packed
    documents need no repacking), `window=(left, 0)` (query i sees keys
    i - left .. i: a sliding window), `softcap` (scores become softcap * tanh(score / softcap)) and
    `sinks` [Hq] (a learned logit per head in each softmax denominator).
    `backend` picks the implementation for this call (default: `get_backend()`).
    """
    _check_inputs(q, k, v, scale)
    left = _check_pattern(q, k, document_ids, window, softcap, sinks)
    which = choose("causal_attention", backend, (q, k, v), lambda: _fused_reason(q), (q.dtype, q.shape[-1]))
    if which == "fused":
        return _fused_attention(q, k, v, scale, document_ids, left, softcap, sinks)
    if which == "torch":
        return _torch_sdpa(q, k, v, scale, document_ids, left, softcap, sinks)
    return reference.causal_attention(q, k, v, scale, document_ids, left, softcap, sinks)[0]


def _fused_attention(q, k, v, scale, document_ids, left, softcap, sinks) -> torch.Tensor:
    """The kernels on checked inputs (causal_attention's fused backend)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    first_key = None
    if document_ids is not None or left is not None:
        first_key = _kernel_first_keys(q, k.shape[2], document_ids, left)
    cap = float(softcap) if softcap is not None else 0.0
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (sinks is not None and sinks.requires_grad)):
        return FusedAttention.apply(q, k, v, first_key, sinks, cap, scale)[0]
    # Nothing to differentiate: no autograd node.
    return torch.ops.scratchformer.attention_fwd(q, k, v, first_key, _float32(sinks), cap, scale)[0]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention over a batch of sequences of different lengths, packed without padding
    (flash_attn_varlen_func's convention): q [total_q, Hq, D], k and v [total_k, Hkv, D]; sequence
    s holds queries cu_seqlens_q[s] .. cu_seqlens_q[s + 1] and keys cu_seqlens_k[s] .. cu_seqlens_k[s + 1]
    (int32 or int64, [batch + 1], starting at 0). Within a sequence, as `causal_attention`: its
    queries are its last positions (a sequence may have fewer queries than keys: a KV cache).
    max_seqlen_q/k, where given, must bound the lengths. Returns [total_q, Hq, D].
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"varlen_attention: {name} must be a 3-D tensor [total tokens, heads, head_dim], "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    lengths = []
    for name, cu, total, bound in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                   ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or len(cu) < 2:
            raise ValueError(f"varlen_attention: {name} must be an int32 tensor [batch + 1] of sequence offsets, got "
                             f"{f'{cu.dtype} of shape {tuple(cu.shape)}' if isinstance(cu, torch.Tensor) else type(cu).__name__}")
        offsets = cu.tolist()
        steps = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[0] != 0 or offsets[-1] != total or min(steps) < 0:
            raise ValueError(f"varlen_attention: {name} must rise from 0 to the {total} packed tokens, got {offsets}")
        if bound is not None and max(steps) > bound:
            raise ValueError(f"varlen_attention: a sequence has {max(steps)} tokens, more than the max_seqlen given ({bound})")
        lengths.append(offsets)
    (starts_q, starts_k) = lengths
    if len(starts_q) != len(starts_k):
        raise ValueError(f"varlen_attention: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {len(starts_q) - 1} and {len(starts_k) - 1}")
    packed = [t.transpose(0, 1)[None] for t in (q, k, v)]  # [1, heads, total, D] views
    if starts_q == starts_k and choose("causal_attention", backend, packed, lambda: _fused_reason(packed[0]),
                                       (q.dtype, q.shape[-1])) == "fused":
        # As many queries as keys in every sequence: one kernel call over the whole batch, each
        # sequence a document of its own (its tiles skipped by the others).
        _check_inputs(*packed, scale)
        left = _check_pattern(*packed[:2], None, window, softcap, sinks, "varlen_attention")
        steps = torch.tensor([b - a for a, b in zip(starts_q, starts_q[1:])], device=q.device)
        documents = torch.repeat_interleave(torch.arange(len(steps), device=q.device), steps)[None]
        return _fused_attention(*packed, scale, documents, left, softcap, sinks)[0].transpose(0, 1)
    outs = []
    for s in range(len(starts_q) - 1):
        (q0, q1), (k0, k1) = starts_q[s : s + 2], starts_k[s : s + 2]
        if q1 - q0 > k1 - k0:
            raise ValueError(f"varlen_attention: sequence {s} has {q1 - q0} queries and {k1 - k0} keys: "
                             "a sequence's queries are its last positions, so it needs at least as many keys")
        if q1 == q0:
            continue
        # One sequence at a time: the reference and torch backends (which would build a mask over the
        # whole batch), and sequences with fewer queries than keys (a document mask aligns no cache).
        seq = causal_attention(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                               v[k0:k1].transpose(0, 1)[None], scale=scale, window=window, softcap=softcap,
                               sinks=sinks, backend=backend)
        outs.append(seq[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


# ---- registration of the compiled ops with torch.library --------------------------------------

if _extensions.kernels is not None:

    @torch.library.register_fake("scratchformer::attention_fwd")
    def _fwd_fake(q, k, v, first_key, sinks, softcap, scale):
        batch, heads, t_q, dim = q.shape
        torch._check(k.shape == v.shape and k.shape[0] == batch and k.shape[3] == dim, lambda: "attention_fwd: bad k/v shape")
        return q.new_empty((batch, heads, t_q, dim)), q.new_empty((batch, heads, t_q), dtype=torch.float32)

    @torch.library.register_fake("scratchformer::attention_bwd")
    def _bwd_fake(dout, q, k, v, out, lse, dlse, first_key, softcap, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
