"""rms_norm and add_rms_norm: RMSNorm over the last dimension (Llama, Mistral, Qwen, Gemma), on the
backend of your choice.

    y = x / sqrt(mean(x^2) + eps) * weight

No fused kernel yet (it is to share the LayerNorm kernel's code): `auto` runs PyTorch's
F.rms_norm, `reference` the formula in reference.py, and `fused` says it cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .backend import choose


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, in x's dtype (weight None: ones)."""
    weight = torch.ones(x.shape[-1:], dtype=x.dtype, device=x.device) if weight is None else weight
    _check_inputs("rms_norm", x, weight, eps)
    if choose("rms_norm", backend, (x, weight)) == "torch":
        return F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps).to(x.dtype)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual and rms_norm(h): returns (y, h)."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"add_rms_norm: residual must match x in shape, dtype and device, got {tuple(residual.shape)} "
                         f"{residual.dtype} on {residual.device} for x {tuple(x.shape)} {x.dtype} on {x.device}")
    h = x + residual
    return rms_norm(h, weight, eps, backend=backend), h
