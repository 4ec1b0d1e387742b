"""The fused LayerNorm kernel (csrc/kernels/layernorm.cu) against the float64 reference.

Following flash-attention's convention: the kernel's error against the float64 truth must be at
most twice the error of the PyTorch reference run in the same low precision, plus a small floor,
for y and for every gradient. Tests marked `cuda` need a GPU and a CUDA build.
"""

import pytest
import torch

from scratchformer import _extensions, ops
from scratchformer.ops import reference
from scratchformer.ops.layer_norm import _fused_reason

CHANNELS = [1, 7, 64, 511, 512, 768, 1024, 4096, 5000, 8192, 8193, 12289, 16384, 65536]  # past 8192: the two-pass backward
ROWS = [1, 3, 1000, 65537]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def poison_allocator(elements: int) -> None:
    """Leave NaNs in the memory the caching allocator hands out next, so an output element the
    kernel forgets to write cannot pass for a correct zero."""
    torch.full((elements,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def make_inputs(rows, channels, dtype, weight_dtype=None, residual=False, device="cuda"):
    weight_dtype = weight_dtype or dtype
    g = torch.Generator(device=device).manual_seed(rows * 100003 + channels)
    x = (torch.randn(rows, channels, device=device, generator=g) * 2 + 0.5).to(dtype)
    r = torch.randn(rows, channels, device=device, generator=g).to(dtype) if residual else None
    w = (torch.randn(channels, device=device, generator=g) * 0.5 + 1).to(weight_dtype)
    b = torch.randn(channels, device=device, generator=g).to(weight_dtype)
    dy = torch.randn(rows, channels, device=device, generator=g).to(dtype)
    return x, r, w, b, dy


def run(backend, x, r, w, b, dy, dh=None):
    """Forward and backward of layer_norm (or add_layer_norm with r): outputs, then gradients.
    backend "truth": the reference on float64 copies of everything."""
    cast = (lambda t: t.double()) if backend == "truth" else (lambda t: t)
    backend = "reference" if backend == "truth" else backend
    leaves = [cast(t.detach()).clone().requires_grad_() for t in (x, w, b) + ((r,) if r is not None else ())]
    if r is None:
        outputs = [ops.layer_norm(*leaves, backend=backend)]
        torch.autograd.backward(outputs, [cast(dy)])
    else:
        x_, w_, b_, r_ = leaves
        outputs = list(ops.add_layer_norm(x_, r_, w_, b_, backend=backend))
        torch.autograd.backward(outputs, [cast(dy), cast(dh)])
    return [o.detach() for o in outputs] + [t.grad for t in leaves]


def assert_within_twice_the_reference(fused, low, truth, names):
    for name, f, l, t in zip(names, fused, low, truth):
        t = t.double()
        err_fused = (f.double() - t).abs().max().item()
        err_ref = (l.double() - t).abs().max().item()
        floor = 1e-5 * (1 + t.abs().max().item())
        assert err_fused <= 2 * err_ref + floor, f"{name}: fused error {err_fused:.3g} > 2 x reference {err_ref:.3g} + {floor:.2g}"


# ---- everywhere -----------------------------------------------------------------------------------


def test_fake_implementations_give_the_shapes_on_meta_tensors():
    x = torch.empty(6, 40, device="meta", dtype=torch.bfloat16)
    w = torch.empty(40, device="meta")
    y, h, mean, rstd = torch.ops.scratchformer.layer_norm_fwd(x, w, w, None, 1e-5)
    assert y.shape == (6, 40) and y.dtype == torch.bfloat16 and h.shape == (0, 40)
    assert mean.shape == rstd.shape == (6,) and mean.dtype == torch.float32
    _, h, _, _ = torch.ops.scratchformer.layer_norm_fwd(x, w, w, x, 1e-5)
    assert h.shape == (6, 40)
    dx, dw, db = torch.ops.scratchformer.layer_norm_bwd(x, x, w, mean, rstd, None)
    assert dx.shape == (6, 40) and dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32


def test_what_the_kernel_refuses():
    x = torch.randn(4, 8, dtype=torch.float64)
    assert "float32, float16 or bfloat16" in _fused_reason(x, x[0], x[0])
    xb = torch.randn(4, 8).bfloat16()
    assert _fused_reason(xb, torch.ones(8), torch.zeros(8)) is None
    assert "share x's dtype or be float32" in _fused_reason(xb, torch.ones(8).half(), torch.zeros(8).half())
    wide = torch.randn(2, 65537).bfloat16()  # any width: rows too wide for registers take a two-pass backward
    assert _fused_reason(wide, torch.ones(65537), torch.zeros(65537)) is None


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_add_layer_norm_matches_float64(backend):
    x, r, w, b, dy = make_inputs(5, 33, torch.float32, residual=True, device="cpu")
    dh = torch.randn_like(x)
    got = run(backend, x, r, w, b, dy, dh)
    truth = run("truth", x, r, w, b, dy, dh)
    for name, g, t in zip(["y", "h", "dx", "dweight", "dbias", "dresidual"], got, truth):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match="residual must match x"):
        ops.add_layer_norm(x, r[:, :5], w, b)


# ---- on a GPU ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("channels", CHANNELS)
def test_forward_and_backward_against_float64(channels, rows, dtype):
    if rows * channels > 2**28:
        pytest.skip("the float64 truth of this shape would not fit next to the rest")
    x, _, w, b, dy = make_inputs(rows, channels, dtype)
    poison_allocator(4 * rows * channels)
    fused = run("fused", x, None, w, b, dy)
    assert all(torch.isfinite(t).all() for t in fused)
    low = run("reference", x, None, w, b, dy)
    truth = run("truth", x, None, w, b, dy)
    assert_within_twice_the_reference(fused, low, truth, ["y", "dx", "dweight", "dbias"])
    if channels == 1:  # x - mean and dy * w - mean(dy * w) are exactly 0: so is dx
        assert torch.equal(fused[1], torch.zeros_like(fused[1]))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_parameters_with_low_precision_input(dtype):
    x, _, w, b, dy = make_inputs(300, 768, dtype, weight_dtype=torch.float32)
    fused = run("fused", x, None, w, b, dy)
    assert fused[2].dtype == torch.float32
    assert_within_twice_the_reference(fused, run("reference", x, None, w, b, dy), run("truth", x, None, w, b, dy), ["y", "dx", "dweight", "dbias"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [7, 512, 5000, 16384, 20001])
def test_residual_variant(channels, dtype):
    x, r, w, b, dy = make_inputs(257, channels, dtype, residual=True)
    dh = torch.randn_like(x)
    poison_allocator(8 * 257 * channels)
    fused = run("fused", x, r, w, b, dy, dh)
    names = ["y", "h", "dx", "dweight", "dbias", "dresidual"]
    assert_within_twice_the_reference(fused, run("reference", x, r, w, b, dy, dh), run("truth", x, r, w, b, dy, dh), names)
    assert torch.equal(fused[2], fused[5])  # h = x + residual: both get the same gradient


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_and_non_contiguous_leading_dimensions(dtype):
    wide, _, w, b, dy = make_inputs(96, 1024, dtype)
    w, b, dy = w[:1000], b[:1000], dy[:, :1000].contiguous()
    results = {}
    for backend in ("fused", "reference", "truth"):
        base = wide.double() if backend == "truth" else wide.clone()
        x = base[:, :1000].requires_grad_()  # rows 1024 elements apart: read in place, not copied
        assert x.stride() == (1024, 1)
        ww, bb = (w.double(), b.double()) if backend == "truth" else (w, b)
        y = ops.layer_norm(x, ww, bb, backend="reference" if backend == "truth" else backend)
        y.backward(dy.to(y.dtype))
        results[backend] = [y.detach(), x.grad]
    assert_within_twice_the_reference(results["fused"], results["reference"], results["truth"], ["y", "dx"])

    x3 = torch.randn(8, 6, 512, device="cuda").to(dtype)[:, ::2]  # leading dimensions not collapsible
    w3, b3 = torch.randn(512, device="cuda").to(dtype), torch.randn(512, device="cuda").to(dtype)
    truth = reference.layer_norm(x3.double(), w3.double(), b3.double())[0]
    low = reference.layer_norm(x3, w3, b3)[0]
    assert_within_twice_the_reference([ops.layer_norm(x3, w3, b3, backend="fused")], [low], [truth], ["y"])


@pytest.mark.cuda
def test_backward_is_deterministic():
    x, _, w, b, dy = make_inputs(65537, 512, torch.bfloat16)
    first = run("fused", x, None, w, b, dy)
    second = run("fused", x, None, w, b, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.cuda
def test_finite_differences_in_float32():
    x, _, w, b, _ = make_inputs(3, 37, torch.float32)
    inputs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b, backend="fused"), inputs, eps=1e-3, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [1, 67, 512, 4096, 8193])
def test_rms_norm_on_the_layer_norm_kernels_against_float64(channels, dtype):
    x, r, w, _, dy = make_inputs(37, channels, dtype, residual=True)
    torch.library.opcheck(torch.ops.scratchformer.rms_norm_fwd.default, (x, w, r, 1e-5))
    for residual in (None, r):
        runs = []
        for name, cast in (("fused", lambda t: t), ("reference", lambda t: t), ("reference", lambda t: t.double())):
            leaves = [cast(t).detach().requires_grad_() for t in (x, w)]
            if residual is None:
                y = ops.rms_norm(leaves[0], leaves[1], 1e-5, backend=name)
            else:
                y = ops.add_rms_norm(leaves[0], cast(residual), leaves[1], 1e-5, backend=name)[0]
            y.backward(cast(dy))
            runs.append([y.detach(), leaves[0].grad, leaves[1].grad])
        assert_within_twice_the_reference(*runs, ["y", "dx", "dweight"])


@pytest.mark.cuda
def test_opcheck_and_compile():
    x, r, w, b, _ = make_inputs(64, 96, torch.float32, residual=True)
    # The op itself (its schema, fake implementation, dynamic shapes); its autograd is FusedLayerNorm's, compiled below.
    torch.library.opcheck(torch.ops.scratchformer.layer_norm_fwd.default, (x, w, b, None, 1e-5))
    torch.library.opcheck(torch.ops.scratchformer.layer_norm_fwd.default, (x, w, b, r, 1e-5))

    def f(x, r, w, b):
        y, h = ops.add_layer_norm(x * 2, r, w, b, backend="fused")
        return (torch.tanh(y) + h).sum()

    compiled = torch.compile(f, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    out = compiled(*leaves)
    out.backward()
    again = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    f(*again).backward()
    torch.testing.assert_close(out, f(*again).detach(), rtol=1e-5, atol=1e-4)
    for a, c in zip(leaves, again):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
def test_bad_input_is_a_clear_error():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ops.FusedUnavailableError, match="float32, float16 or bfloat16, not torch.float64"):
        ops.layer_norm(x.double(), torch.ones(8, device="cuda").double(), torch.zeros(8, device="cuda").double(), backend="fused")
    with pytest.raises(RuntimeError, match="weight must be contiguous with shape \\[8\\]"):
        torch.ops.scratchformer.layer_norm_fwd(x, torch.ones(9, device="cuda"), torch.zeros(9, device="cuda"), None, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        torch.ops.scratchformer.layer_norm_fwd(x, torch.ones(8, device="cuda"), torch.zeros(8, device="cuda"), None, 0.0)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        torch.ops.scratchformer.layer_norm_fwd(x.cpu(), torch.ones(8), torch.zeros(8), None, 1e-5)
