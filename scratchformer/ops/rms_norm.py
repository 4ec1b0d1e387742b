"""rms_norm and add_rms_norm: RMSNorm over the last dimension (Llama, Mistral, Qwen, Gemma), on the
backend of your choice.

    y = x / sqrt(mean(x^2) + eps) * weight

The fused backend is `torch.ops.scratchformer.rms_norm_fwd` / `rms_norm_bwd`: the LayerNorm kernels
of csrc/kernels/layernorm.cu without the mean and the bias (one template), through layer_norm.py's
`_fused` and `FusedLayerNorm` with no bias; `torch` is F.rms_norm, `reference` the formula in reference.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extensions
from . import reference
from .backend import choose
from .layer_norm import FUSED_DTYPES, _fused


def _check_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dim() == 0 or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor with at least one dimension, got {x.dtype} of shape {tuple(x.shape)}")
    if not weight.is_floating_point() or weight.shape != x.shape[-1:]:
        raise ValueError(f"{op}: weight must be a floating-point tensor of shape ({x.shape[-1]},) to match x's last "
                         f"dimension, got {weight.dtype} of shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")


def _fused_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    if x.dtype not in FUSED_DTYPES:
        return f"the kernel takes float32, float16 or bfloat16, not {x.dtype}"
    if weight.dtype not in (x.dtype, torch.float32):
        return f"weight must share x's dtype or be float32, got {weight.dtype}"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, in x's dtype (weight None: ones)."""
    weight = torch.ones(x.shape[-1:], dtype=x.dtype, device=x.device) if weight is None else weight
    _check_inputs("rms_norm", x, weight, eps)
    which = choose("rms_norm", backend, (x, weight), lambda: _fused_reason(x, weight), (x.dtype, weight.dtype))
    if which == "fused":
        return _fused(x, weight, None, None, eps)[0]
    if which == "torch":
        return F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps).to(x.dtype)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual and rms_norm(h), in one pass with the fused kernel: returns (y, h)."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"add_rms_norm: residual must match x in shape, dtype and device, got {tuple(residual.shape)} "
                         f"{residual.dtype} on {residual.device} for x {tuple(x.shape)} {x.dtype} on {x.device}")
    weight = torch.ones(x.shape[-1:], dtype=x.dtype, device=x.device) if weight is None else weight
    _check_inputs("add_rms_norm", x, weight, eps)
    which = choose("rms_norm", backend, (x, residual, weight), lambda: _fused_reason(x, weight), (x.dtype, weight.dtype))
    if which == "fused":
        return _fused(x, weight, None, residual, eps)
    h = x + residual
    return rms_norm(h, weight, eps, backend=which), h


# ---- registration of the compiled ops with torch.library --------------------------------------

if _extensions.kernels is not None:

    @torch.library.register_fake("scratchformer::rms_norm_fwd")
    def _fwd_fake(x, weight, residual, eps):
        rows, channels = x.shape
        torch._check(weight.shape == (channels,), lambda: "rms_norm_fwd: weight must be [C]")
        h = x.new_empty((rows if residual is not None else 0, channels))
        return x.new_empty((rows, channels)), h, x.new_empty((rows,), dtype=torch.float32)

    @torch.library.register_fake("scratchformer::rms_norm_bwd")
    def _bwd_fake(dy, x, weight, rstd, grad_h):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)
