"""Loads the compiled extensions once, remembering why one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch  # noqa: F401  (the kernels library links against libtorch: load torch first)


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"scratchformer.{name}"), None
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


kernels, kernels_error = _load("_kernels")  # importing it registers the torch.ops.scratchformer ops
bpe, bpe_error = _load("_bpe")

cuda_archs: tuple[int, ...] = tuple(kernels.cuda_archs()) if kernels is not None else ()
