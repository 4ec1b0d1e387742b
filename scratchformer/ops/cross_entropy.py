"""linear_cross_entropy: the LM head and its loss in one op, without the [N, V] logits in memory.

A language model's last matmul and its cross-entropy hold the largest activations of a step:
the logits and their gradient, N x V each (16,384 x 50,257 in fp32 is 3.3 GB). The fused path
walks the rows in chunks sized by a memory budget: each chunk's logits are computed (the matmul
through torch, so cuBLAS on a GPU), turned into the loss and its gradient in place, and the
gradients of hidden, weight and bias accumulate chunk by chunk during the forward, so that the
backward is a scale (with reduction "none", whose row weights arrive only in the backward, the
backward recomputes each chunk instead). On a GPU the chunk's loss and gradient come from one
kernel (csrc/kernels/cross_entropy.cu: two passes over each row, the gradient written over the
logits in their own dtype); elsewhere, and for float64, from PyTorch ops.

Backends: `fused` and `auto` (the chunked path, on any device), `torch` (F.linear and
F.cross_entropy, logits materialised), `reference` (reference.linear_cross_entropy, the formula).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _extensions
from . import reference
from .backend import _validate, choose, get_backend

REDUCTIONS = ("mean", "sum", "none")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK_BYTES = 32 * 2**20  # the float32 logits of one chunk; its temporaries are about as large again


def _check_inputs(hidden, weight, targets, bias, label_smoothing, reduction, softcap) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be [N, d] and weight [V, d], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)} (flatten the batch and time dimensions: hidden.flatten(0, -2))")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be integer ids of shape [{hidden.shape[0]}], got "
                         f"{targets.dtype} of shape {tuple(targets.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden and weight must share a floating-point dtype, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if softcap is not None and not 0 < softcap < math.inf:
        raise ValueError(f"linear_cross_entropy: softcap must be a positive number or None, got {softcap}")


def _kernel_reason(z: torch.Tensor) -> str | None:
    return None if z.dtype in KERNEL_DTYPES else f"the kernel takes float32, float16 or bfloat16, not {z.dtype}"


def _chunk(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, row_scale):
    """Loss per row (float32, 0 where ignored) of one chunk, and with `row_scale` (per row, or a
    number) the gradient of sum(row_scale * loss) with respect to the chunk's logits, in place of
    them. The logits are computed in the inputs' dtype, the rest in float32 (float64 for float64)."""
    z = F.linear(hidden, weight, bias)
    if choose("cross_entropy_chunk", "auto", (z,), lambda: _kernel_reason(z), (z.dtype,)) == "fused":
        scale, per_row = (1.0, row_scale) if isinstance(row_scale, torch.Tensor) else (row_scale or 1.0, None)
        if per_row is not None:
            per_row = per_row.float().expand(z.shape[0]).contiguous()
        loss = torch.ops.scratchformer.cross_entropy_chunk(z, targets, per_row, scale, ignore_index, label_smoothing,
                                                           softcap or 0.0, row_scale is not None)
        return loss, (z if row_scale is not None else None)
    valid = targets != ignore_index
    z = z.to(torch.promote_types(hidden.dtype, torch.float32))
    cap_grad = None
    if softcap is not None:
        z = torch.tanh(z.div_(softcap))
        cap_grad = 1 - z * z if row_scale is not None else None  # d softcap*tanh(l/softcap) / dl
        z.mul_(softcap)
    safe = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(z, dim=1)
    loss = (1 - label_smoothing) * (lse - z.gather(1, safe)[:, 0])
    if label_smoothing:
        loss += label_smoothing * (lse - z.mean(dim=1))
    loss = torch.where(valid, loss, 0.0)
    if row_scale is None:
        return loss, None
    # d loss / d z = softmax(z) - (1 - ls) * onehot(target) - ls / V, for rows not ignored.
    grad = z.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, safe, torch.full_like(safe, -(1 - label_smoothing), dtype=grad.dtype))
    if label_smoothing:
        grad.sub_(label_smoothing / z.shape[1])
    grad.mul_((valid * row_scale)[:, None])
    if cap_grad is not None:
        grad.mul_(cap_grad)
    return loss, grad


def _rows_per_chunk(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, CHUNK_BYTES // (4 * vocab))


def _walk(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, chunk_rows, row_scale, grads):
    """Every row's loss; with `grads` (grad_hidden, grad_weight in float32, grad_bias in float32 or
    None), the gradients of sum(row_scale * loss) accumulated into them."""
    losses = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    step = _rows_per_chunk(weight.shape[0], chunk_rows)
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        h, t = hidden[rows], targets[rows]
        scale = row_scale[rows] if isinstance(row_scale, torch.Tensor) and row_scale.dim() else row_scale
        loss, grad = _chunk(h, weight, bias, t, ignore_index, label_smoothing, softcap, scale if grads else None)
        losses[rows] = loss
        if grads:
            grad_hidden, grad_weight, grad_bias = grads
            g = grad.to(weight.dtype)
            grad_hidden[rows] = g @ weight
            grad = grad.to(grad_weight.dtype)  # the kernel's gradient is in the logits' dtype: sums in float32
            grad_weight.addmm_(grad.T, h.to(grad.dtype))
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            del grad, g
    return losses


def _reduce(losses: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / count if reduction == "mean" else total  # mean over no rows: nan, as F.cross_entropy


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, label_smoothing, reduction, softcap, chunk_rows):
        valid_count = (targets != ignore_index).sum()
        ctx.args = (ignore_index, label_smoothing, softcap, chunk_rows)
        ctx.reduction, ctx.has_bias = reduction, bias is not None
        if reduction == "none":  # the row weights come with the backward: recompute there
            ctx.save_for_backward(hidden, weight, bias, targets)
            return _walk(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, chunk_rows, None, None)
        stat = torch.promote_types(hidden.dtype, torch.float32)
        scale = 1.0 / valid_count.clamp(min=1).to(stat) if reduction == "mean" else 1.0
        grads = _new_grads(hidden, weight, bias)
        losses = _walk(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, chunk_rows, scale, grads)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return _reduce(losses, valid_count, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            grads = _new_grads(hidden, weight, bias)
            _walk(hidden, weight, bias, targets, *ctx.args, grad_output, grads)
        else:
            grads = list(ctx.saved_tensors) + ([None] if not ctx.has_bias else [])
            grads = [g * grad_output if g is not None else None for g in grads]
        grad_hidden, grad_weight, grad_bias = grads
        weight_dtype = grad_hidden.dtype
        return (grad_hidden, grad_weight.to(weight_dtype), grad_bias.to(weight_dtype) if grad_bias is not None else None,
                None, None, None, None, None, None)


def _new_grads(hidden, weight, bias):
    stat = torch.promote_types(hidden.dtype, torch.float32)
    return [torch.empty_like(hidden), torch.zeros(weight.shape, dtype=stat, device=weight.device),
            torch.zeros(weight.shape[0], dtype=stat, device=weight.device) if bias is not None else None]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight.T + bias [N, V] against targets [N], as
    F.cross_entropy computes it (label smoothing spreads its mass uniformly over the V tokens;
    rows whose target is ignore_index count for nothing; "mean" divides by the rows counted, nan
    when there are none), with logits capped at softcap * tanh(logits / softcap) first if given.
    Differentiable in hidden, weight and bias. The fused path holds `chunk_rows` rows of logits
    at a time (default: 32 MB of float32 logits)."""
    _check_inputs(hidden, weight, targets, bias, label_smoothing, reduction, softcap)
    which = _validate(backend if backend is not None else get_backend())
    if which == "reference":
        return reference.linear_cross_entropy(hidden, weight, targets, bias, label_smoothing, ignore_index, reduction, softcap)
    if which == "torch":
        logits = F.linear(hidden, weight, bias).to(torch.promote_types(hidden.dtype, torch.float32))
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    targets = targets.long()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, label_smoothing, reduction,
                                               softcap, chunk_rows)
    losses = _walk(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, chunk_rows, None, None)
    return _reduce(losses, (targets != ignore_index).sum(), reduction)


if _extensions.kernels is not None:

    @torch.library.register_fake("scratchformer::cross_entropy_chunk")
    def _chunk_fake(logits, targets, row_scale, scale, ignore_index, label_smoothing, softcap, grad):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)
