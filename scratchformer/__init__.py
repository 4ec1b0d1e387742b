"""scratchformer: a GPT-2-style language model built from scratch, on its own kernels."""

__all__ = ["BuildInfo", "build_info"]


def __getattr__(name: str):
    # build.py imports torch: loaded on first use, so that `import scratchformer.tokenizer` does not.
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
