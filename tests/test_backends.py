"""Backend selection: defaults, per-call choice, fallbacks, errors, autograd on every backend."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scratchformer import _extensions, ops
from scratchformer.ops import backend as backend_module
from scratchformer.ops import reference


def qkv(n_kv_heads=2, t_q=9, t_k=13, dtype=torch.float64, grad=False):
    shape_q, shape_kv = (2, 4, t_q, 8), (2, n_kv_heads, t_k, 8)
    make = lambda s: torch.randn(*s, dtype=dtype, requires_grad=grad)  # noqa: E731
    return make(shape_q), make(shape_kv), make(shape_kv)


def ln_inputs(dtype=torch.float64, grad=False):
    return (
        torch.randn(3, 5, 24, dtype=dtype, requires_grad=grad),
        torch.randn(24, dtype=dtype, requires_grad=grad),
        torch.randn(24, dtype=dtype, requires_grad=grad),
    )


def test_default_backend_is_auto_and_settable():
    assert ops.get_backend() == "auto"
    assert ops.set_backend("torch") == "auto"
    assert ops.get_backend() == "torch"
    assert ops.set_backend("reference") == "torch"


def test_unknown_backend_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, fused, reference, torch"):
        ops.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.causal_attention(*qkv(), backend="fast")
    assert ops.get_backend() == "auto"


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_every_backend_gives_the_reference_result(name):
    q, k, v = qkv()
    truth = reference.causal_attention(q, k, v)[0]
    torch.testing.assert_close(ops.causal_attention(q, k, v, backend=name), truth, rtol=1e-12, atol=1e-12)
    x, w, b = ln_inputs()
    torch.testing.assert_close(ops.layer_norm(x, w, b, backend=name), reference.layer_norm(x, w, b)[0], rtol=1e-12, atol=1e-12)


def counting(monkeypatch, module, name, calls):
    real = getattr(module, name)
    label = ("F." if module is F else "reference.") + name
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(label) or real(*a, **kw))


def test_auto_on_cpu_runs_pytorchs_op_never_the_reference(monkeypatch):
    calls = []
    for module, name in ((reference, "causal_attention"), (reference, "layer_norm"),
                         (F, "scaled_dot_product_attention"), (F, "layer_norm")):
        counting(monkeypatch, module, name, calls)
    ops.causal_attention(*qkv(dtype=torch.float32))
    ops.layer_norm(*ln_inputs(dtype=torch.float32))
    assert calls == ["F.scaled_dot_product_attention", "F.layer_norm"]


@pytest.mark.parametrize("head_dim", [16, 80, 256])
def test_auto_on_a_head_dim_the_kernel_lacks_runs_sdpa_and_says_why_once(monkeypatch, head_dim):
    """As on a GPU whose kernels cannot take the call: PyTorch's op runs, one warning per reason."""
    monkeypatch.setattr(backend_module, "_gpu_reason", lambda tensors: None)
    monkeypatch.setattr(backend_module, "_said", set())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    calls = []
    counting(monkeypatch, F, "scaled_dot_product_attention", calls)
    counting(monkeypatch, reference, "causal_attention", calls)
    q, k, v = (torch.randn(1, 2, 5, head_dim) for _ in range(3))
    with pytest.warns(RuntimeWarning, match=f"causal_attention runs on PyTorch's own op here: head_dim {head_dim} is not"):
        ops.causal_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.causal_attention(q, k, v)  # said once
    assert calls == ["F.scaled_dot_product_attention"] * 2


def test_auto_on_a_dtype_the_layer_norm_kernel_lacks_runs_pytorchs_layer_norm(monkeypatch):
    monkeypatch.setattr(backend_module, "_gpu_reason", lambda tensors: None)
    calls = []
    counting(monkeypatch, F, "layer_norm", calls)
    counting(monkeypatch, reference, "layer_norm", calls)
    x, w, b = ln_inputs()  # float64: no kernel takes it
    y = ops.layer_norm(x, w, b)
    assert calls == ["F.layer_norm"]
    torch.testing.assert_close(y, F.layer_norm(x, (24,), w, b))
    assert backend_module.choose("layer_norm", None, (x,), lambda: "no") == "torch"


def test_per_call_backend_overrides_the_default(monkeypatch):
    calls = []
    real = reference.causal_attention
    monkeypatch.setattr(reference, "causal_attention", lambda *a: calls.append("ref") or real(*a))
    ops.set_backend("torch")
    ops.causal_attention(*qkv())
    assert calls == []  # the default, torch, ran
    ops.causal_attention(*qkv(), backend="reference")
    assert calls == ["ref"]


def test_forcing_fused_without_a_kernel_names_the_reason():
    with pytest.raises(ops.FusedUnavailableError, match="rotary: backend 'fused' cannot run: this build has no fused rotary kernel"):
        backend_module.choose("rotary", "fused", qkv())
    assert backend_module.choose("rotary", "auto", qkv()) == "torch"


def test_forcing_fused_attention_on_cpu_tensors_names_the_reason():
    reason = "run on CUDA tensors, got cpu" if _extensions.cuda_archs else "built without CUDA kernels"
    call = lambda: ops.causal_attention(*qkv(), backend="fused")  # noqa: E731
    with pytest.raises(ops.FusedUnavailableError, match=f"causal_attention: backend 'fused' cannot run: .*{reason}"):
        call()
    ops.set_backend("fused")  # the process-wide default is held to the same rule
    with pytest.raises(ops.FusedUnavailableError, match=reason):
        call()


def test_forcing_fused_on_cpu_tensors_names_the_reason():
    reason = "run on CUDA tensors, got cpu" if _extensions.cuda_archs else "built without CUDA kernels"
    with pytest.raises(ops.FusedUnavailableError, match=f"layer_norm: backend 'fused' cannot run: .*{reason}"):
        ops.layer_norm(*ln_inputs(dtype=torch.float32), backend="fused")
    assert backend_module.choose("layer_norm", "auto", ln_inputs(), lambda: None) == "torch"


def test_fused_reasons_for_an_op_with_a_kernel(monkeypatch):
    """choose() explains each way a fused kernel can be out of reach."""
    tensors = ln_inputs()
    never_mind = lambda: None  # noqa: E731  (the op itself would accept these inputs)

    if _extensions.cuda_archs:
        with pytest.raises(ops.FusedUnavailableError, match="run on CUDA tensors, got cpu"):
            backend_module.choose("layer_norm", "fused", tensors, never_mind)
    monkeypatch.setattr(_extensions, "cuda_problem", _extensions.cuda_mismatch("13.0", "12.8"))
    with pytest.raises(ops.FusedUnavailableError, match="compiled with CUDA 13.0 but torch .* uses CUDA 12.8: reinstall"):
        backend_module.choose("layer_norm", "fused", tensors, never_mind)
    monkeypatch.setattr(_extensions, "cuda_problem", None)
    monkeypatch.setattr(_extensions, "cuda_archs", ())
    with pytest.raises(ops.FusedUnavailableError, match="built without CUDA kernels"):
        backend_module.choose("layer_norm", "fused", tensors, never_mind)
    monkeypatch.setattr(_extensions, "kernels", None)
    monkeypatch.setattr(_extensions, "kernels_error", "ImportError: undefined symbol: foo")
    with pytest.raises(ops.FusedUnavailableError, match="did not load .*undefined symbol: foo"):
        backend_module.choose("layer_norm", "fused", tensors, never_mind)
    assert backend_module.choose("layer_norm", "auto", tensors, never_mind) == "torch"


@pytest.mark.parametrize("name", ["reference", "torch"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_gradients_on_every_backend(name, n_kv_heads):
    q, k, v = qkv(n_kv_heads=n_kv_heads, t_q=5, t_k=7, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.causal_attention(q, k, v, backend=name), (q, k, v))


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_layer_norm_gradients_on_every_backend(name):
    x, w, b = ln_inputs(grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b, backend=name), (x, w, b))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(1, 6, 4, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)), "6 query heads must be a multiple of the 4"),
        (lambda: (torch.randn(1, 4, 5, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)), "got 5 queries and 4 keys"),
        (lambda: (torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8).double(), torch.randn(1, 4, 4, 8)), "share a dtype"),
        (lambda: (torch.randn(4, 4, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)), "q must be 4-D"),
        (lambda: (torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 5, 8)), "k and v must have the same shape"),
        (lambda: (torch.randn(1, 4, 4, 16), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)), "agree on batch and head_dim"),
        (lambda: (torch.ones(1, 4, 4, 8, dtype=torch.long),) * 3, "must be float16, bfloat16, float32 or float64, got torch.int64"),
    ],
)
@pytest.mark.parametrize("name", ["auto", "reference", "torch"])
def test_attention_rejects_bad_input_on_every_backend(make, message, name):
    with pytest.raises(ValueError, match=message):
        ops.causal_attention(*make(), backend=name)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(2, 8), torch.randn(7), torch.randn(8)), r"weight must have shape \(8,\)"),
        ((torch.randn(2, 8), torch.randn(8), torch.randn(1, 8)), r"bias must have shape \(8,\)"),
        ((torch.randn(2, 8), torch.randn(8), torch.randn(8), 0.0), "eps must be > 0"),
        ((torch.tensor(1.0), torch.randn(1), torch.randn(1)), "at least one dimension"),
        ((torch.randint(0, 9, (2, 8)), None, None), "x must be a floating-point tensor, got torch.int64"),
        ((torch.randn(2, 8), torch.ones(8, dtype=torch.int32), None), "weight must be a floating-point tensor"),
    ],
)
@pytest.mark.parametrize("name", ["auto", "reference", "torch"])
def test_layer_norm_rejects_bad_input_on_every_backend(args, message, name):
    with pytest.raises(ValueError, match=message):
        ops.layer_norm(*args, backend=name)


def test_layer_norm_accepts_fp32_parameters_with_low_precision_input():
    x = torch.randn(4, 32).bfloat16()
    w, b = torch.randn(32), torch.randn(32)
    for name in ("reference", "torch"):
        y = ops.layer_norm(x, w, b, backend=name)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), reference.layer_norm(x.double(), w.double(), b.double())[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["auto", "reference", "torch"])
def test_layer_norm_weight_and_bias_may_be_none_as_in_torch(name):
    x, w, b = torch.randn(3, 5, 16), torch.randn(16), torch.randn(16)
    for weight, bias in ((None, None), (w, None), (None, b)):
        expected = torch.nn.functional.layer_norm(x, (16,), weight, bias)
        torch.testing.assert_close(ops.layer_norm(x, weight, bias, backend=name), expected)
        y, h = ops.add_layer_norm(x, x.flip(0), weight, bias, backend=name)
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + x.flip(0), (16,), weight, bias))


@pytest.mark.parametrize(
    "capability, runs",
    [(80, True), (86, True), (89, True), (90, True), (100, True), (103, True), (110, True), (120, True), (121, True),
     (130, True), (75, False), (70, False)],
)
def test_which_gpus_the_default_build_runs_on(capability, runs):
    # The default arch list: machine code for sm_80, sm_90, sm_100, sm_120, and PTX of compute_100
    # (which an sm_110 compiles when the kernels load: no cubin of its major).
    from scratchformer.ops.backend import arch_reason

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import cuda_toolkit

    default = cuda_toolkit.DEFAULT_ARCH_LIST
    reason = arch_reason(capability, tuple(cuda_toolkit.real_archs(default)), cuda_toolkit.ptx_arch(default))
    assert (reason is None) == runs
    if not runs:
        assert f"this GPU is sm_{capability}: reinstall with TORCH_CUDA_ARCH_LIST={capability // 10}.{capability % 10}" in reason
    assert arch_reason(130, (80, 90), 0) is not None  # without PTX, a newer major needs a rebuild


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["auto", "reference", "torch"])
def test_every_backend_refuses_a_scale_that_is_not_positive(name, scale):
    """SDPA returned NaN for them and the kernel refuses them: no backend answers differently."""
    with pytest.raises(ValueError, match=f"scale must be a positive number, got {scale}"):
        ops.causal_attention(*qkv(), scale=scale, backend=name)


def test_attention_input_mistakes_are_one_clear_error():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="causal_attention: q must be a torch.Tensor, got list"):
        ops.causal_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"):
        ops.causal_attention(*(t.to(torch.float8_e4m3fn) for t in (q, k, v)))
    empty = torch.zeros(2, 4, 9, 0)
    with pytest.raises(ValueError, match="head_dim must be at least 1"):
        ops.causal_attention(empty, empty, empty)
    # The model's [B, T, H, D] passed as it is: T read as heads, H as time.
    b_t_h_d = torch.randn(2, 9, 4, 8)
    with pytest.raises(ValueError, match=r"did you pass \[batch, time, heads, head_dim\]\? \.transpose\(1, 2\)"):
        ops.causal_attention(b_t_h_d, torch.randn(2, 13, 4, 8), torch.randn(2, 13, 4, 8))


@pytest.mark.parametrize("name", ["auto", "reference", "torch"])
def test_meta_tensors_give_shapes_on_every_backend(name):
    """Meta tensors (shapes without data, as when a model is sized before its weights load) flow
    through every op, as through PyTorch's own."""
    q, kv = torch.empty(2, 4, 5, 8, device="meta"), torch.empty(2, 2, 7, 8, device="meta")
    out = ops.causal_attention(q, kv, kv, backend=name)
    assert out.is_meta and out.shape == q.shape
    x, w = torch.empty(6, 32, device="meta"), torch.empty(32, device="meta")
    assert ops.layer_norm(x, w, w, backend=name).shape == x.shape
    y, residual = ops.add_layer_norm(x, x, w, w, backend=name)
    assert y.is_meta and y.shape == residual.shape == x.shape
