"""Loads the compiled extensions once, remembering why one is missing.

The tokenizer core (_bpe) loads without torch, so the tokenizer commands stay quick; the kernels
library links against libtorch, so it (and torch) load on first use of `kernels`, `cuda_archs`,
`ptx_arch` or `cuda_problem`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"scratchformer.{name}"), None
    except ImportError as e:
        error = f"{type(e).__name__}: {e}"
        if isinstance(e, ModuleNotFoundError) and not list(Path(__file__).parent.glob(f"{name}.*.so")):
            error += (
                f" (this scratchformer, {Path(__file__).parent}, has no compiled extensions: if it is"
                " a source checkout, run from another directory to use the installed package, or"
                " build in place with `python setup.py build_ext --inplace`)"
            )
        return None, error


bpe, bpe_error = _load("_bpe")


def cuda_mismatch(kernels_cuda: str | None, torch_cuda: str | None) -> str | None:
    """Why CUDA kernels compiled with `kernels_cuda` cannot run beside a torch on `torch_cuda`."""
    import torch

    if kernels_cuda is None or (torch_cuda or "").split(".")[0] == kernels_cuda.split(".")[0]:
        return None
    return (
        f"the CUDA kernels were compiled with CUDA {kernels_cuda} but torch {torch.__version__} uses "
        f"{'CUDA ' + torch_cuda if torch_cuda else 'no CUDA'}: reinstall scratchformer against this torch "
        "(pip install --no-build-isolation --force-reinstall --no-deps .)"
    )


def _load_kernels() -> dict:
    import torch  # the kernels library links against libtorch: load torch first

    kernels, error = _load("_kernels")  # importing it registers the torch.ops.scratchformer ops
    return {
        "kernels": kernels,
        "kernels_error": error,
        "cuda_archs": tuple(kernels.cuda_archs()) if kernels is not None else (),
        "ptx_arch": kernels.ptx_arch() if kernels is not None else 0,
        "cuda_problem": cuda_mismatch(kernels.cuda_version() if kernels is not None else None, torch.version.cuda),
    }


def __getattr__(name: str):
    if name in ("kernels", "kernels_error", "cuda_archs", "ptx_arch", "cuda_problem"):
        loaded = _load_kernels()
        globals().update(loaded)  # later lookups (and tests' monkeypatching) see plain attributes
        return loaded[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
