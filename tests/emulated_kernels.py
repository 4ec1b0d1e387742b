"""Build the CUDA kernels' source (attention, LayerNorm, the cross-entropy chunk) for the CPU emulator (tests/emulator)
and call their launchers.

The `.cu` files are compiled by g++ as they are, with three mechanical rewrites: the `<<<grid,
block, shared, stream>>>` launches become `emu::launch(...)` calls, the dynamic shared memory
declaration becomes a pointer to the emulator's buffer, and each static `__shared__` array is
followed by a call that fills it with garbage at the start of every block; `tensor_core.cuh` (mma.sync, ldmatrix,
cp.async) and `hopper.cuh` (wgmma, bulk tensor copies, mbarriers) are replaced by their twins in tests/emulator. Everything else, the index arithmetic,
masking, softmax and statistics, barriers and the launchers' dispatch, is the code that runs on
a GPU.
"""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"
EMULATOR = Path(__file__).resolve().parent / "emulator"
SOURCES = ["attention_fwd.cu", "attention_bwd.cu", "attention_simt.cu", "attention_hopper.cu", "layernorm.cu", "cross_entropy.cu"]
HEADERS = ["attention.cuh", "attention_launch.cuh", "common.cuh", "kernels.h"]
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# kernel<...><<<launch configuration>>>(  ->  emu::launch(kernel<...>, launch configuration,
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(")
DYNAMIC_SHARED = "extern __shared__ __align__(16) unsigned char smem[];"
# __shared__ float a[N][M], b[N];  ->  the same, then emu::fresh_shared(a, sizeof(a)); ... for each array
STATIC_SHARED = re.compile(r"__shared__[^;]*;")


def _fresh_shared(match: re.Match) -> str:
    names = re.findall(r"(\w+)\s*\[", match.group(0))
    assert names, f"no array in the shared memory declaration {match.group(0)!r}"
    return match.group(0) + "".join(f" emu::fresh_shared({n}, sizeof({n}));" for n in names)


def _contraction_flags() -> list[str] | None:
    """g++ flags under which a * b + c becomes one fused multiply-add wherever nvcc would fuse
    it (nvcc contracts by default), or None if this CPU has no FMA instruction. At -O1, g++ forms
    fmas only with -fexpensive-optimizations."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ["-ffp-contract=fast", "-fexpensive-optimizations"]
    if machine in ("x86_64", "amd64"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
        return ["-mfma", "-ffp-contract=fast", "-fexpensive-optimizations"] if re.search(r"^flags\s*:.*\bfma\b", flags, re.M) else None
    return None


def contracts() -> bool:
    """Whether the emulated kernels fuse multiply-adds as the GPU build does."""
    return _contraction_flags() is not None


def build(work: Path, patches: dict[str, tuple[str, str]] | None = None) -> Path:
    """Compile the emulated kernels into work/libattention_emulated.so. `patches` maps a file
    name to (text, replacement): a deliberate mutation, for tests that the emulator catches it."""
    patches = patches or {}

    def read(name: str) -> str:
        text = (KERNELS / name).read_text()
        if name in patches:
            old, new = patches[name]
            assert text.count(old) == 1, f"the patch for {name} does not match exactly once"
            text = text.replace(old, new)
        return text

    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in HEADERS:
        (src / name).write_text(read(name))
    for name in ("tensor_core.cuh", "hopper.cuh"):
        shutil.copy(EMULATOR / name, src / name)
    sources = []
    for name in SOURCES:
        text = read(name)
        text, launches = LAUNCH.subn(r"emu::launch(\1, \2, ", text)
        assert launches, f"no kernel launch found in {name}"
        text = text.replace(DYNAMIC_SHARED, "unsigned char* smem = emu::dynamic_smem();")
        text = STATIC_SHARED.sub(_fresh_shared, text)
        path = src / (Path(name).stem + ".cpp")
        path.write_text(text)
        sources.append(str(path))
    library = work / "libattention_emulated.so"
    # Locals start as a byte pattern, not whatever the stack held (often zeros), like registers.
    # Multiply-adds fused as nvcc fuses them: an expression whose result depends on rounding a
    # product (one that needs __fmul_rn) shows it here too.
    cmd = ["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-ftrivial-auto-var-init=pattern",
           *(_contraction_flags() or []),
           "-I", str(src), "-I", str(EMULATOR),
           *sources, str(EMULATOR / "harness.cpp"), "-o", str(library)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the emulated kernels failed:\n{result.stderr[-8000:]}")
    return library


class EmulatedKernels:
    """scratchformer's kernel launchers, run on the CPU emulator with torch CPU tensors."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        for name in ("attention_forward", "attention_backward", "layer_norm_forward", "layer_norm_backward", "cross_entropy"):
            getattr(self.lib, f"emulated_{name}").restype = ctypes.c_char_p

    @staticmethod
    def _ints(values, kind=ctypes.c_longlong):
        return (kind * len(values))(*values)

    @staticmethod
    def _shape(q, k):
        batch, heads, t_q, dim = q.shape
        return (ctypes.c_int * 6)(batch, heads, k.shape[1], t_q, k.shape[2], dim)

    def _args(self, t):
        assert t.stride(-1) == 1
        return ctypes.c_void_p(t.data_ptr()), self._ints(t.stride()[:3])

    @staticmethod
    def _first_key(first_key, q):
        if first_key is None:
            return ctypes.c_void_p(None)
        assert first_key.dtype == torch.int32 and first_key.shape == (q.shape[0], q.shape[2]) and first_key.is_contiguous()
        return ctypes.c_void_p(first_key.data_ptr())

    def forward(self, q, k, v, scale, sm_count=8, arch=80, first_key=None, sinks=None, softcap=0.0):
        """(out, lse, splits): splits is how many key ranges the launcher chose. arch: the emulated
        GPU's compute capability (90: an H100, where the launcher takes the wgmma kernel).
        first_key: the pattern, int32 [B, Tq]; sinks: float32 [Hq]; softcap: 0 for none (kernels.h)."""
        sinks = sinks.float().contiguous() if sinks is not None else None
        out = torch.full(q.shape, float("nan"), dtype=q.dtype)
        lse = torch.full(q.shape[:3], float("nan"))
        splits = ctypes.c_int()
        err = self.lib.emulated_attention_forward(
            DTYPES[q.dtype], self._shape(q, k), sm_count, arch, *self._args(q), *self._args(k), *self._args(v),
            self._first_key(first_key, q), ctypes.c_void_p(sinks.data_ptr() if sinks is not None else None),
            ctypes.c_float(softcap), ctypes.c_float(scale), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_void_p(lse.data_ptr()), ctypes.byref(splits))
        assert err is None, err.decode()
        return out, lse, splits.value

    def backward(self, dout, q, k, v, out, lse, scale, dlse=None, sm_count=8, arch=80, first_key=None, softcap=0.0):
        """(dq, dk, dv); dlse: the gradient reaching the log-sum-exp, if any. `self.dkv_splits` is
        how many sets the launcher cut each kv group's query heads into for this GPU size."""
        out, lse = out.contiguous(), lse.contiguous()
        dlse = dlse.float().contiguous() if dlse is not None else None
        dq = torch.full(q.shape, float("nan"), dtype=q.dtype)
        dk = torch.full(k.shape, float("nan"), dtype=k.dtype)
        dv = torch.full(k.shape, float("nan"), dtype=k.dtype)
        splits = ctypes.c_int()
        err = self.lib.emulated_attention_backward(
            DTYPES[q.dtype], self._shape(q, k), *self._args(q), *self._args(k), *self._args(v), *self._args(dout),
            ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(lse.data_ptr()),
            ctypes.c_void_p(dlse.data_ptr() if dlse is not None else None), self._first_key(first_key, q), ctypes.c_float(softcap), ctypes.c_float(scale),
            ctypes.c_void_p(dq.data_ptr()), ctypes.c_void_p(dk.data_ptr()), ctypes.c_void_p(dv.data_ptr()),
            sm_count, arch, ctypes.byref(splits))
        assert err is None, err.decode()
        self.dkv_splits = splits.value
        return dq, dk, dv

    def layer_norm_forward(self, x, weight, bias, residual=None, eps=1e-5):
        """(y, h, mean, rstd) for x [rows, C] with unit stride along C; h is None without residual.
        bias None: RMSNorm (mean comes back as zeros)."""
        rows, channels = x.shape
        y = torch.full((rows, channels), float("nan"), dtype=x.dtype)
        h = torch.full((rows, channels), float("nan"), dtype=x.dtype) if residual is not None else None
        mean, rstd = torch.full((rows,), float("nan")), torch.full((rows,), float("nan"))
        ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else None)  # noqa: E731
        err = self.lib.emulated_layer_norm_forward(
            DTYPES[x.dtype], DTYPES[weight.dtype], ptr(x), ctypes.c_longlong(x.stride(0)), ptr(residual),
            ctypes.c_longlong(residual.stride(0) if residual is not None else 0), ptr(weight), ptr(bias), ptr(y), ptr(h),
            ptr(mean), ptr(rstd), ctypes.c_longlong(rows), channels, ctypes.c_float(eps))
        assert err is None, err.decode()
        return y, h, mean, rstd

    def cross_entropy_chunk(self, logits, targets, row_scale=None, scale=1.0, ignore_index=-100, label_smoothing=0.0,
                            softcap=0.0, grad=True):
        """Each row's loss (float32); with `grad`, the logits are overwritten by the gradient."""
        rows, vocab = logits.shape
        loss = torch.full((rows,), float("nan"))
        ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else None)  # noqa: E731
        err = self.lib.emulated_cross_entropy(
            DTYPES[logits.dtype], ptr(logits), ctypes.c_longlong(logits.stride(0)), ptr(targets), ptr(row_scale),
            ctypes.c_float(scale), ctypes.c_longlong(ignore_index), ctypes.c_float(label_smoothing), ctypes.c_float(softcap),
            ptr(loss), ctypes.c_longlong(rows), vocab, ctypes.c_bool(grad))
        assert err is None, err.decode()
        return loss

    def layer_norm_backward(self, dy, x, weight, mean, rstd, grad_h=None):
        """(dx, dweight, dbias); x is the normalized input (h in the residual variant). mean None:
        RMSNorm's backward (no dbias: None)."""
        rows, channels = x.shape
        dx = torch.full((rows, channels), float("nan"), dtype=x.dtype)
        dweight = torch.full((channels,), float("nan"), dtype=weight.dtype)
        dbias = torch.full((channels,), float("nan"), dtype=weight.dtype) if mean is not None else None
        ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else None)  # noqa: E731
        err = self.lib.emulated_layer_norm_backward(
            DTYPES[x.dtype], DTYPES[weight.dtype], ptr(dy), ptr(x), ctypes.c_longlong(x.stride(0)), ptr(weight),
            ptr(mean), ptr(rstd), ptr(grad_h), ptr(dx), ptr(dweight), ptr(dbias), ctypes.c_longlong(rows), channels)
        assert err is None, err.decode()
        return dx, dweight, dbias
