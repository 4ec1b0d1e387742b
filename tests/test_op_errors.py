"""A rejected input to a C++ op is a Python RuntimeError carrying the op's own message.

The ops are registered for the CPU key too (csrc/kernels/ops.cpp), where the same checks refuse
CPU tensors, so this path (STD_TORCH_CHECK's throw, through TORCH_BOX and torch's boxed kernel,
to Python) runs on every build and every machine, GPU or not. CI runs this file under the oldest
and the newest torch the README supports.
"""

import sys

import pytest
import torch

from scratchformer import _extensions

pytestmark = pytest.mark.skipif(_extensions.kernels is None, reason="the kernels library did not load")
ops = torch.ops.scratchformer


def ln_args(grad=False):
    x = torch.randn(4, 8, requires_grad=grad)
    return x, torch.ones(8, requires_grad=grad), torch.zeros(8, requires_grad=grad)


def attention_args(grad=False, head_dim=64):
    return [torch.randn(1, 4, 8, head_dim, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "autograd"])
def test_each_op_raises_its_message(grad):
    x, w, b = ln_args(grad)
    with pytest.raises(RuntimeError, match="scratchformer::layer_norm_fwd: x must be a CUDA tensor"):
        ops.layer_norm_fwd(x, w, b, None, 1e-5)
    with pytest.raises(RuntimeError, match="scratchformer::layer_norm_fwd: x must be a CUDA tensor"):
        ops.layer_norm_fwd(x, w, b, x, 1e-5)  # with the optional residual
    stats = torch.zeros(4)
    with pytest.raises(RuntimeError, match="scratchformer::layer_norm_bwd: x must be a CUDA tensor"):
        ops.layer_norm_bwd(x.detach(), x.detach(), w.detach(), stats, stats, None)
    with pytest.raises(RuntimeError, match="scratchformer::rms_norm_fwd: x must be a CUDA tensor"):
        ops.rms_norm_fwd(x, w, x, 1e-5)
    with pytest.raises(RuntimeError, match="scratchformer::rms_norm_bwd: x must be a CUDA tensor"):
        ops.rms_norm_bwd(x.detach(), x.detach(), w.detach(), stats, None)
    q, k, v = attention_args(grad)
    with pytest.raises(RuntimeError, match="scratchformer::attention_fwd: q must be a CUDA tensor"):
        ops.attention_fwd(q, k, v, None, None, 0.0, 0.125)
    with pytest.raises(RuntimeError, match="scratchformer::attention_fwd: scale must be positive, got -1"):
        ops.attention_fwd(q, k, v, None, None, 0.0, -1.0)  # the op's first check, before any tensor is looked at
    lse = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="scratchformer::attention_bwd: q must be a CUDA tensor"):
        ops.attention_bwd(q.detach(), q.detach(), k.detach(), v.detach(), q.detach(), lse, None, None, 0.0, 0.125)


def test_a_refused_call_leaves_its_inputs_alone():
    """Each tensor handed to a refused call is released exactly once: neither leaked (the
    reference count comes back) nor freed twice (the tensor still holds its values, and a
    thousand refusals later the process is still here)."""
    x, w, b = ln_args()
    q, k, v = attention_args()
    before = [sys.getrefcount(t) for t in (x, w, b, q)]
    copies = [t.clone() for t in (x, w, b, q)]
    for _ in range(1000):
        with pytest.raises(RuntimeError):
            ops.layer_norm_fwd(x, w, b, x, 1e-5)
        with pytest.raises(RuntimeError):
            ops.attention_fwd(q, q, q, None, None, 0.0, 0.125)
    assert [sys.getrefcount(t) for t in (x, w, b, q)] == before
    assert all(torch.equal(t, c) for t, c in zip((x, w, b, q), copies))
