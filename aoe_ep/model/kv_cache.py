"""Keys and values of the positions already decoded, so that generation runs each new token through the model once
instead of re-running the whole prefix. Training never builds one: without a cache attention is unchanged."""

from __future__ import annotations

import torch


class LayerKVCache:
    """One attention layer's keys and values [B, N, max_len, K]; positions [0, length) are filled."""

    def __init__(self, owner: KVCache, k_BNMH: torch.Tensor, v_BNMH: torch.Tensor):
        self.owner, self.k_BNMH, self.v_BNMH = owner, k_BNMH, v_BNMH

    @property
    def length(self) -> int:
        return self.owner.length

    def append(self, k_BNSH: torch.Tensor, v_BNSH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the S new positions after the cached ones; returns keys and values of all length + S positions."""
        begin, end = self.length, self.length + k_BNSH.shape[2]
        self.k_BNMH[:, :, begin:end] = k_BNSH
        self.v_BNMH[:, :, begin:end] = v_BNSH
        return self.k_BNMH[:, :, :end], self.v_BNMH[:, :, :end]


class KVCache:
    """Per-layer caches for `batch` sequences of up to `max_len` positions; `Decoder.forward(tokens, cache)` fills
    the next positions and advances `length` once every layer has appended."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: int,
        d_head: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len, self.length = max_len, 0
        shape = (batch, n_heads, max_len, d_head)
        self.layers = [
            LayerKVCache(
                self, torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
            )
            for _ in range(n_layers)
        ]

    def advance(self, steps: int) -> None:
        self.length += steps

    def crop(self, length: int) -> None:
        """Forget the positions from `length` on (e.g. to reuse a shared prompt's cache)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self.length = length
