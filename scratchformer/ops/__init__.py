"""scratchformer's ops: each with a fused CUDA kernel, a from-scratch reference and PyTorch's own.

See `backend.py` for how the implementation is chosen, `reference.py` for the math.
"""

from .attention import causal_attention, varlen_attention
from .backend import BACKENDS, FusedUnavailableError, get_backend, set_backend
from .cross_entropy import linear_cross_entropy
from .layer_norm import add_layer_norm, layer_norm
from .rms_norm import add_rms_norm, rms_norm
from . import selfcheck  # noqa: E402,I001  (installs the first-use check that `auto` consults)

__all__ = [
    "BACKENDS",
    "add_layer_norm",
    "add_rms_norm",
    "FusedUnavailableError",
    "causal_attention",
    "get_backend",
    "layer_norm",
    "linear_cross_entropy",
    "rms_norm",
    "set_backend",
    "varlen_attention",
]
