"""The LayerNorm kernels' own CUDA source (csrc/kernels/layernorm.cu), and RMSNorm on them, run on the CPU emulator
(tests/emulator), against the float64 reference with the GPU tests' rule: the kernel's error at
most twice the reference's in the same precision, plus a small floor, for y, h and every
gradient. Covers the vectorized and the element-wise paths, fp32 weights next to 16-bit inputs,
the fused residual add, strided rows, and the dweight/dbias sums kept per row chunk in the dx
pass and added in order by a second kernel.
"""

import pytest
import torch

from emulated_kernels import contracts as emulated_kernels_contract
from scratchformer.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(rows, channels, dtype, weight_dtype=None, stride=None):
    g = torch.Generator().manual_seed(rows * 100003 + channels)
    stride = stride or channels
    x = (torch.randn(rows, stride, generator=g) * 2 + 0.5).to(dtype)[:, :channels]
    r = torch.randn(rows, channels, generator=g).to(dtype)
    w = (torch.randn(channels, generator=g) * 0.5 + 1).to(weight_dtype or dtype)
    b = torch.randn(channels, generator=g).to(weight_dtype or dtype)
    dy, dh = torch.randn(rows, channels, generator=g).to(dtype), torch.randn(rows, channels, generator=g).to(dtype)
    return x, r, w, b, dy, dh


def _norm(h, w, b):
    return reference.layer_norm(h, w, b)[0] if b is not None else reference.rms_norm(h, w, 1e-5)


def reference_run(x, r, w, b, dy, dh, cast):
    """y (and h), then dx, dweight, dbias (and dresidual) through autograd of the reference; b None:
    RMSNorm (no dbias)."""
    leaves = [cast(t).clone().requires_grad_() for t in (x, w, b, r) if t is not None]
    if r is None:
        y = _norm(leaves[0], leaves[1], leaves[2] if b is not None else None)
        y.backward(cast(dy))
        return [y.detach()] + [t.grad for t in leaves]
    h = leaves[0] + leaves[-1]
    y = _norm(h, leaves[1], leaves[2] if b is not None else None)
    torch.autograd.backward([y, h], [cast(dy), cast(dh)])
    return [y.detach(), h.detach()] + [t.grad for t in leaves]


def emulated_run(kernels, x, r, w, b, dy, dh):
    y, h, mean, rstd = kernels.layer_norm_forward(x, w, b, r)
    normalized = h if r is not None else x
    dx, dw, db = kernels.layer_norm_backward(dy, normalized, w, mean if b is not None else None, rstd,
                                             dh if r is not None else None)
    return [y] + ([h] if r is not None else []) + [dx, dw] + ([db] if b is not None else []) + ([dx] if r is not None else [])


def assert_within_twice_the_reference(got, low, truth):
    for i, (g, l, t) in enumerate(zip(got, low, truth)):
        assert torch.isfinite(g).all(), f"output {i}: not finite (an element was never written?)"
        err = (g.double() - t.double()).abs().max().item()
        err_ref = (l.double() - t.double()).abs().max().item()
        floor = 1e-5 * (1 + t.abs().max().item())
        assert err <= 2 * err_ref + floor, f"output {i}: kernel error {err:.3g} > 2 x reference {err_ref:.3g} + {floor:.2g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
# Widths from one value to the backward's limit (8192: two vectors per thread at 16 bits, four at
# 32), and row counts that leave some of a chunk's row lanes idle.
@pytest.mark.parametrize("rows, channels", [(1, 1), (3, 7), (37, 64), (41, 300), (5, 511), (9, 768), (2, 5000), (3, 8192)])
def test_emulated_layer_norm_against_float64(emulated, rows, channels, dtype):
    x, _, w, b, dy, _ = make_inputs(rows, channels, dtype)
    got = emulated_run(emulated, x, None, w, b, dy, None)
    low = reference_run(x, None, w, b, dy, None, lambda t: t)
    truth = reference_run(x, None, w, b, dy, None, lambda t: t.double())
    assert_within_twice_the_reference(got, low, truth)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("channels, stride", [(512, 512), (100, 104), (96, 99)])
def test_emulated_residual_variant_with_float32_parameters_and_strided_rows(emulated, channels, stride, dtype):
    x, r, w, b, dy, dh = make_inputs(21, channels, dtype, weight_dtype=torch.float32, stride=stride)
    assert x.stride(0) == stride
    got = emulated_run(emulated, x, r, w, b, dy, dh)
    assert got[3].dtype == torch.float32
    low = reference_run(x, r, w, b, dy, dh, lambda t: t)
    truth = reference_run(x, r, w, b, dy, dh, lambda t: t.double())
    assert_within_twice_the_reference(got, low, truth)


@pytest.mark.slow
def test_the_emulator_gives_each_block_garbage_shared_memory(tmp_path):
    """A block reduction that read all 32 slots of its shared scratch, not only those its warps
    wrote, reads zeros from a zero-initialised array and passes; on a GPU, and here, it reads
    whatever is there (NaN), and fails."""
    from emulated_kernels import EmulatedKernels, build

    read = "v = lane < warps ? scratch[threadIdx.y][lane] : 0.f;"
    mutated = EmulatedKernels(build(tmp_path, {"common.cuh": (read, "v = scratch[threadIdx.y][lane];")}))
    x, _, w, b, dy, _ = make_inputs(37, 64, torch.float32)
    got = emulated_run(mutated, x, None, w, b, dy, None)
    assert not torch.isfinite(got[0]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rows, channels", [(3, 8193), (5, 12289), (2, 16384), (2, 65536)])
def test_emulated_wide_rows_against_float64(emulated, rows, channels, dtype):
    """Rows wider than the register-resident backward (8192) take the two-pass path: dx from one
    block per row, dweight/dbias column by column; odd widths take its element-wise loads."""
    x, r, w, b, dy, dh = make_inputs(rows, channels, dtype)
    got = emulated_run(emulated, x, None, w, b, dy, None)
    assert_within_twice_the_reference(got, reference_run(x, None, w, b, dy, None, lambda t: t),
                                      reference_run(x, None, w, b, dy, None, lambda t: t.double()))
    got = emulated_run(emulated, x, r, w, b, dy, dh)  # with the residual's gradient added to dx
    assert_within_twice_the_reference(got, reference_run(x, r, w, b, dy, dh, lambda t: t),
                                      reference_run(x, r, w, b, dy, dh, lambda t: t.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_emulated_one_channel_gives_exactly_zero_dx(emulated, dtype):
    """With C = 1, x - mean is exactly 0, and so is g - mean(g): dx must be exactly 0 (rstd is
    1/sqrt(eps), about 316, so any rounding left in g - mean(g) would show)."""
    x, _, w, b, dy, _ = make_inputs(1000, 1, dtype)
    got = emulated_run(emulated, x, None, w, b, dy, None)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.slow
@pytest.mark.skipif(not emulated_kernels_contract(), reason="the host compiler cannot emit fused multiply-adds here")
def test_the_emulator_contracts_multiply_adds_as_nvcc_does(tmp_path):
    """nvcc fuses a * b - c into one fma (no rounding of a * b); the emulator's build does too
    (-ffp-contract=fast with FMA), so the product computed twice unrounded, as before the kernel
    rounded g = dy * weight once, leaves dx of a one-channel row nonzero here as on the GPU."""
    from emulated_kernels import EmulatedKernels, build

    rounded = "const float g = __fmul_rn(d[k], w[k]);  // the g of the row's sums, bit for bit"
    mutated = EmulatedKernels(build(tmp_path, {"layernorm.cu": (rounded, "const float g = d[k] * w[k];")}))
    x, _, w, b, dy, _ = make_inputs(1000, 1, torch.float32)
    got = emulated_run(mutated, x, None, w, b, dy, None)
    assert got[1].abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rows, channels", [(1, 1), (3, 7), (37, 64), (41, 300), (9, 768), (3, 8192), (3, 8193), (2, 16384)])
def test_emulated_rms_norm_against_float64(emulated, rows, channels, dtype):
    """RMSNorm on the LayerNorm kernels (no bias: no mean, no dbias), narrow and wide rows, with and
    without the fused residual add."""
    x, r, w, _, dy, dh = make_inputs(rows, channels, dtype)
    for res, grad_h in ((None, None), (r, dh)):
        got = emulated_run(emulated, x, res, w, None, dy, grad_h)
        assert_within_twice_the_reference(got, reference_run(x, res, w, None, dy, grad_h, lambda t: t),
                                          reference_run(x, res, w, None, dy, grad_h, lambda t: t.double()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_emulated_rms_norm_with_float32_weight_and_strided_rows(emulated, dtype):
    x, r, w, _, dy, dh = make_inputs(21, 100, dtype, weight_dtype=torch.float32, stride=104)
    got = emulated_run(emulated, x, r, w, None, dy, dh)
    assert got[3].dtype == torch.float32
    assert_within_twice_the_reference(got, reference_run(x, r, w, None, dy, dh, lambda t: t),
                                      reference_run(x, r, w, None, dy, dh, lambda t: t.double()))
