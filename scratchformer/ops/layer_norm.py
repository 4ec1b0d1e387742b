"""layer_norm and add_layer_norm: LayerNorm over the last dimension, on the backend of your choice.

The fused backend is `torch.ops.scratchformer.layer_norm_fwd` / `layer_norm_bwd`
(csrc/kernels/layernorm.cu), given fake implementations here so that `torch.compile(fullgraph=True)`
traces through them, and differentiated by `FusedLayerNorm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extensions
from . import reference
from .backend import choose

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension")
    if not x.is_floating_point():
        raise ValueError(f"layer_norm: x must be a floating-point tensor, got {x.dtype} (convert it with x.float())")
    channels = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if not t.is_floating_point():
            raise ValueError(f"layer_norm: {name} must be a floating-point tensor, got {t.dtype}")
        if t.shape != (channels,):
            raise ValueError(
                f"layer_norm: {name} must have shape ({channels},) to match x's last dimension, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
    if not eps > 0:
        raise ValueError(f"layer_norm: eps must be > 0, got {eps}")


def _affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight and bias, with None meaning 1 and 0 as in F.layer_norm."""
    if weight is None:
        like = bias if bias is not None and bias.is_floating_point() else x
        weight = torch.ones(x.shape[-1:], dtype=like.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros_like(weight)
    return weight, bias


def _fused_reason(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    if x.dtype not in FUSED_DTYPES:
        return f"the kernel takes float32, float16 or bfloat16, not {x.dtype}"
    if weight.dtype != bias.dtype or weight.dtype not in (x.dtype, torch.float32):
        return f"weight and bias must share x's dtype or be float32, got {weight.dtype} and {bias.dtype}"
    return None


def _norm_fwd(x, weight, bias, residual, eps):
    """(y, h, mean, rstd) from the kernels: LayerNorm, or RMSNorm where bias is None (mean None)."""
    if bias is None:
        y, h, rstd = torch.ops.scratchformer.rms_norm_fwd(x, weight, residual, eps)
        return y, h, None, rstd
    return torch.ops.scratchformer.layer_norm_fwd(x, weight, bias, residual, eps)


class FusedLayerNorm(torch.autograd.Function):
    """The kernels and their backward as one autograd node, for LayerNorm and (bias None) RMSNorm,
    which share them. (A torch.library autograd
    registration costs more Python per call: the dispatcher calls back into Python, which
    redispatches and refills the op's defaults; the host time of every call is the point here.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        y, h, mean, rstd = _norm_fwd(x, weight, bias, residual, eps)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)
        ctx.set_materialize_grads(False)
        if not ctx.has_residual:
            ctx.mark_non_differentiable(h)  # an empty placeholder
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        normalized, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(normalized)
        grad_h = dh.contiguous() if ctx.has_residual and dh is not None else None
        if mean is None:  # RMSNorm: no bias
            dx, dweight = torch.ops.scratchformer.rms_norm_bwd(dy.contiguous(), normalized, weight, rstd, grad_h)
            dbias = None
        else:
            dx, dweight, dbias = torch.ops.scratchformer.layer_norm_bwd(dy.contiguous(), normalized, weight, mean, rstd, grad_h)
        return dx, dweight, dbias, (dx if ctx.has_residual else None), None


def _fused(x, weight, bias, residual, eps):
    """The kernels on x of any shape: LayerNorm, or RMSNorm where bias is None."""
    shape, channels = x.shape, x.shape[-1]
    flat = x.dim() != 2  # 2-D inputs go as they are: a view costs host time too
    if flat:
        x = x.reshape(-1, channels)  # a view when the leading dimensions allow one
        residual = residual.reshape(-1, channels) if residual is not None else None
    weight, bias = weight.contiguous(), bias.contiguous() if bias is not None else None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        y, h = FusedLayerNorm.apply(x, weight, bias, residual, eps)
    else:  # nothing to differentiate: the op alone, without an autograd node's cost
        y, h, _, _ = _norm_fwd(x, weight, bias, residual, eps)
    if residual is None:
        h = None
    return (y.view(shape), h.view(shape) if h is not None else None) if flat else (y, h)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension, in x's dtype.

    weight and bias None stand for ones and zeros (as in F.layer_norm). `backend` picks the
    implementation for this call (default: `get_backend()`).
    """
    weight, bias = _affine(x, weight, bias)
    _check_inputs(x, weight, bias, eps)
    which = choose("layer_norm", backend, (x, weight, bias), lambda: _fused_reason(x, weight, bias), (x.dtype, weight.dtype))
    if which == "fused":
        return _fused(x, weight, bias, None, eps)[0]
    if which == "torch":
        return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)
    return reference.layer_norm(x, weight, bias, eps)[0]


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual and layer_norm(h), in one pass with the fused kernel: returns (y, h)."""
    weight, bias = _affine(x, weight, bias)
    _check_inputs(x, weight, bias, eps)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"add_layer_norm: residual must match x in shape, dtype and device, got {tuple(residual.shape)} "
            f"{residual.dtype} on {residual.device} for x {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    which = choose("layer_norm", backend, (x, residual, weight, bias), lambda: _fused_reason(x, weight, bias),
                   (x.dtype, weight.dtype))
    if which == "fused":
        return _fused(x, weight, bias, residual, eps)
    h = x + residual
    if which == "torch":
        return F.layer_norm(h, (h.shape[-1],), weight.to(h.dtype), bias.to(h.dtype), eps), h
    return reference.layer_norm(h, weight, bias, eps)[0], h


# ---- registration of the compiled ops with torch.library --------------------------------------

if _extensions.kernels is not None:

    @torch.library.register_fake("scratchformer::layer_norm_fwd")
    def _fwd_fake(x, weight, bias, residual, eps):
        rows, channels = x.shape
        torch._check(weight.shape == (channels,) and bias.shape == (channels,), lambda: "layer_norm_fwd: weight and bias must be [C]")
        h = x.new_empty((rows if residual is not None else 0, channels))
        stats = x.new_empty((rows,), dtype=torch.float32)
        return x.new_empty((rows, channels)), h, stats, torch.empty_like(stats)

    @torch.library.register_fake("scratchformer::layer_norm_bwd")
    def _bwd_fake(dy, x, weight, mean, rstd, grad_h):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)
