"""scratchformer: a GPT-2-style language model built from scratch, on its own kernels."""

from .build import BuildInfo, build_info

__all__ = ["BuildInfo", "build_info"]
