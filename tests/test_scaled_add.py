"""The wiring op: compiled, registered, traced by torch.compile, with autograd."""

import pytest
import torch

from scratchformer.ops import scaled_add

OP = torch.ops.scratchformer.scaled_add.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_on_cpu(dtype):
    a, b = torch.randn(7, 33, dtype=dtype), torch.randn(7, 33, dtype=dtype)
    torch.testing.assert_close(scaled_add(a, b, -0.75), a + -0.75 * b)


def test_non_contiguous_and_empty_inputs():
    a, b = torch.randn(33, 7).t(), torch.randn(7, 33)
    torch.testing.assert_close(scaled_add(a, b, 2.0), a + 2.0 * b)
    assert scaled_add(torch.empty(0, 3), torch.empty(0, 3), 1.0).shape == (0, 3)


@pytest.mark.parametrize(
    "a, b, message",
    [
        (torch.randn(3, 4), torch.randn(3, 5), "same shape .*size 4 vs 5 at dim 1"),
        (torch.randn(3, 4), torch.randn(4), "same shape"),
        (torch.randn(3), torch.randn(3).double(), "same dtype"),
        (torch.randn(3).half(), torch.randn(3).half(), "CPU supports float32 and float64, got Half"),
    ],
)
def test_bad_input_is_a_clear_error(a, b, message):
    with pytest.raises(RuntimeError, match=message):
        scaled_add(a, b, 1.0)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    a = torch.randn(5, 6, requires_grad=requires_grad)
    b = torch.randn(5, 6, requires_grad=requires_grad)
    torch.library.opcheck(OP, (a, b, 0.5))
    torch.library.opcheck(OP, (a.t(), b.t(), -3.0))


def test_gradients():
    a = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: scaled_add(a, b, 1.7), (a, b))


def test_torch_compile_fullgraph_traces_the_op():
    def f(a, b):
        return torch.tanh(scaled_add(a * 2, b, 0.25)).sum()

    compiled = torch.compile(f, fullgraph=True)
    a = torch.randn(16, 8, requires_grad=True)
    b = torch.randn(16, 8, requires_grad=True)
    out = compiled(a, b)
    out.backward()
    got = (a.grad.clone(), b.grad.clone())
    a.grad = b.grad = None
    f(a, b).backward()
    torch.testing.assert_close(out, f(a, b))
    torch.testing.assert_close(got, (a.grad, b.grad))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_fp32_math(dtype):
    a = torch.randn(1000, 257, device="cuda").to(dtype)
    b = torch.randn(1000, 257, device="cuda").to(dtype)
    out = scaled_add(a, b, 0.3)
    assert out.dtype == dtype and out.device == a.device
    expected = (a.double() + 0.3 * b.double()).to(dtype)
    torch.testing.assert_close(out, expected)  # within one rounding of dtype


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    a = torch.randn(64, 9, device="cuda", requires_grad=True)
    b = torch.randn(64, 9, device="cuda", requires_grad=True)
    torch.library.opcheck(OP, (a, b, 0.5))
    compiled = torch.compile(lambda a, b: scaled_add(a, b, 2.0).square().sum(), fullgraph=True)
    torch.testing.assert_close(compiled(a, b), (a + 2.0 * b).square().sum())


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    with pytest.raises(RuntimeError, match="same device"):
        scaled_add(torch.randn(3, device="cuda"), torch.randn(3), 1.0)
