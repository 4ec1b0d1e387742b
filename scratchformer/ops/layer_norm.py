"""layer_norm: LayerNorm over the last dimension, on the backend of your choice."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .backend import choose


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension")
    channels = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (channels,):
            raise ValueError(
                f"layer_norm: {name} must have shape ({channels},) to match x's last dimension, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
    if not eps > 0:
        raise ValueError(f"layer_norm: eps must be > 0, got {eps}")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension, in x's dtype.

    `backend` picks the implementation for this call (default: `get_backend()`).
    """
    _check_inputs(x, weight, bias, eps)
    if choose("layer_norm", backend, (x, weight, bias)) == "torch":
        return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)
    return reference.layer_norm(x, weight, bias, eps)[0]
