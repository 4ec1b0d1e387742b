"""scaled_add(a, b, alpha) = a + alpha * b, as the compiled op `torch.ops.scratchformer.scaled_add`.

A deliberately trivial op that proves the kernels' wiring end to end: a plain-CUDA kernel and a
CPU loop registered through torch's stable ABI (csrc/kernels/ops.cpp), with the fake (meta)
implementation and autograd registered here, so `torch.compile(fullgraph=True)` traces it and
`torch.library.opcheck` passes. The first real kernel takes over its tests.
"""

from __future__ import annotations

import torch

from .. import _extensions

OP = "scratchformer::scaled_add"

if _extensions.kernels is not None:

    @torch.library.register_fake(OP)
    def _fake(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
        torch._check(a.shape == b.shape, lambda: "scaled_add: a and b must have the same shape")
        torch._check(a.dtype == b.dtype, lambda: "scaled_add: a and b must have the same dtype")
        return a.new_empty(a.shape)  # the kernel always writes a contiguous output

    def _setup_context(ctx, inputs, output) -> None:
        ctx.alpha = inputs[2]

    def _backward(ctx, grad: torch.Tensor):
        return grad, grad * ctx.alpha, None

    torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


def scaled_add(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """a + alpha * b through the compiled op (CPU: float32/float64; CUDA: float32/16, bfloat16)."""
    if _extensions.kernels is None:
        raise RuntimeError(f"scaled_add needs the scratchformer._kernels extension, which did not load: {_extensions.kernels_error}")
    return torch.ops.scratchformer.scaled_add(a, b, alpha)
