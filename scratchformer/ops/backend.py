"""Choosing the backend that runs an op.

| backend     | runs                                                    | where                  |
| ----------- | ------------------------------------------------------- | ---------------------- |
| `fused`     | scratchformer's CUDA kernel                             | CUDA tensors, kernels built |
| `reference` | the from-scratch math in `reference.py`                 | everywhere             |
| `torch`     | PyTorch's own op (scaled_dot_product_attention, layer_norm) | everywhere         |
| `auto`      | `fused` where it can run and has passed its first-use check (selfcheck.py), `torch` otherwise | |

Each op takes `backend=` per call; `set_backend` sets the default for the process.
Asking for `fused` where it cannot run raises `FusedUnavailableError` saying why. `auto` never
falls back to `reference`: it materialises what the kernels avoid (attention's T x T scores) and
is many times slower than PyTorch's op on a GPU; it is the definition tests check against. On a
GPU, each fallback is said once per op and reason (a warning); on the CPU, where no kernel
exists, PyTorch's op is simply what runs.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch

from .. import _extensions

BACKENDS = ("auto", "fused", "reference", "torch")

_default = "auto"
# Whether `auto` may run a fused configuration on a device: (op, device index, config) -> bool.
# selfcheck.py, a layer above the ops, installs its first-use check here; None trusts them all.
_first_use_check: Callable[[str, int, tuple], bool] | None = None


def set_first_use_check(check: Callable[[str, int, tuple], bool] | None) -> None:
    global _first_use_check
    _first_use_check = check


class FusedUnavailableError(RuntimeError):
    """The `fused` backend was asked for where it cannot run."""


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> str:
    """Set the process-wide default backend; returns the previous one."""
    global _default
    previous, _default = _default, _validate(name)
    return previous


def get_backend() -> str:
    """The process-wide default backend."""
    return _default


_capabilities: dict[int | None, tuple[int, int]] = {}


@torch.compiler.assume_constant_result
def _capability(index: int | None) -> tuple[int, int]:
    # A constant to torch.compile: the choice of kernel is made while tracing, not in the graph.
    # Asked once per device: torch builds a properties object on every query.
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def _gpu_reason(tensors: Iterable[torch.Tensor]) -> str | None:
    """Why no fused kernel of this build can run on these tensors, or None if one can."""
    if _extensions.kernels is None:
        return f"the scratchformer._kernels extension did not load ({_extensions.kernels_error})"
    if _extensions.cuda_problem:
        return _extensions.cuda_problem
    if not _extensions.cuda_archs:
        return (
            "scratchformer was built without CUDA kernels (reinstall with nvcc and a CUDA build "
            "of torch present; `scratchformer info` shows what was built)"
        )
    devices = {t.device for t in tensors}
    if any(d.type != "cuda" for d in devices):
        return f"the fused kernels run on CUDA tensors, got {', '.join(sorted(map(str, devices)))}"
    major, minor = _capability(next(iter(devices)).index)
    return arch_reason(10 * major + minor, _extensions.cuda_archs, _extensions.ptx_arch)


def arch_reason(capability: int, archs: tuple[int, ...], ptx_arch: int) -> str | None:
    """Why kernels compiled for `archs` (with PTX of `ptx_arch`, or 0) cannot run on a GPU of
    `capability` (e.g. 86), or None. Machine code for sm_XY runs on sm_XZ with Z >= Y (same
    major version); PTX is compiled by the driver for any GPU at least as new."""
    if any(a // 10 == capability // 10 and a <= capability for a in archs) or (ptx_arch and capability >= ptx_arch):
        return None
    built = ", ".join(f"sm_{a}" for a in archs) + (f" (+ PTX of compute_{ptx_arch})" if ptx_arch else "")
    return (
        f"the kernels were compiled for {built}, this GPU is sm_{capability}: reinstall with "
        f"TORCH_CUDA_ARCH_LIST={capability // 10}.{capability % 10}"
    )


def choose(
    op: str,
    backend: str | None,
    tensors: Iterable[torch.Tensor],
    fused_reason: Callable[[], str | None] | None = None,
    config: tuple = (),
) -> str:
    """The backend that runs `op`: "fused", "reference" or "torch".

    `fused_reason` says why the op's kernel cannot take these particular inputs (dtype, head
    size...), or None if it can; leave it out while the op has no fused kernel. `config` names
    the kernel configuration these inputs run (for `selfcheck`: `auto` runs a configuration only
    once it has matched the reference on the device).
    """
    name = _validate(backend if backend is not None else _default)
    if name in ("reference", "torch"):
        return name
    if fused_reason is None:
        reason = f"this build has no fused {op} kernel"
    else:
        reason = _gpu_reason(tensors) or fused_reason()
    if reason is None:
        if name == "auto" and _first_use_check is not None:
            device = next(iter(tensors)).device
            index = -1 if device.type != "cuda" else device.index if device.index is not None else torch.cuda.current_device()
            if not _first_use_check(op, index, config):
                return "torch"  # the check has said why
        return "fused"
    if name == "fused":
        raise FusedUnavailableError(
            f"{op}: backend 'fused' cannot run: {reason}. Use backend 'auto' to fall back to "
            "PyTorch's op, or 'torch' / 'reference' explicitly."
        )
    if any(t.is_cuda for t in tensors):
        _say_once(op, reason)
    return "torch"


_said: set[tuple[str, str]] = set()


def _say_once(op: str, reason: str) -> None:
    if (op, reason) in _said or torch.compiler.is_compiling():
        return
    _said.add((op, reason))
    warnings.warn(f"scratchformer: {op} runs on PyTorch's own op here: {reason}", RuntimeWarning, stacklevel=4)
