"""The KV cache: keys and values of the positions decoded so far, so each step runs the model on
the newest token only (model.py reads and extends it, sampling.py creates it)."""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding."""

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.kv_heads, config.context, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0  # positions cached
        self.capacity = config.context
        # The document number of each cached position, for a document mask or left padding.
        self.documents = torch.zeros(batch_size, config.context, dtype=torch.long, device=device)

    def add_documents(self, documents: torch.Tensor) -> torch.Tensor:
        """Store the new positions' document numbers [B, T] (counted from 0 within this step's tokens),
        continuing the cached ones; return the numbers of all positions, cached and new."""
        if self.length:
            documents = documents + self.documents[:, self.length - 1 : self.length]
        end = self.length + documents.shape[1]
        self.documents[:, self.length : end] = documents
        return self.documents[:, :end]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, Hkv, T, D] for `layer`; return all cached keys and values."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
