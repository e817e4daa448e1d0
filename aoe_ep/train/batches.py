"""Which samples each rank reads at each step, and how they become tensors.

Dataset items are deterministic functions of (seed, index), so the data position is one number, the count of
samples consumed: a step reads samples [consumed, consumed + B) with B = global_batch_tokens / seq_len, and
micro-batch m of rank r is the `mbs` samples from consumed + (m·world + r)·mbs. A resumed run, with any number of
ranks, reads exactly the samples the uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aoe_ep.config import Config, ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """seq_len tokens per sample; global_samples sequences per optimiser step, split into micro-batches of
    micro_batch_size per rank; num_micro_batches of them per rank and step (gradient accumulation)."""

    seq_len: int
    global_samples: int
    micro_batch_size: int
    world_size: int
    rank: int

    @property
    def num_micro_batches(self) -> int:
        return self.global_samples // (self.micro_batch_size * self.world_size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_samples * self.seq_len

    def indices(self, first_sample: int, micro: int) -> range:
        start = first_sample + (micro * self.world_size + self.rank) * self.micro_batch_size
        return range(start, start + self.micro_batch_size)


def plan_batches(cfg: Config, world_size: int, rank: int) -> BatchPlan:
    """The batch layout of `cfg` on `world_size` ranks; a global batch that cannot be split is a ConfigError."""
    t, seq = cfg.train, cfg.data.seq_len
    if seq > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len: {seq} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if t.global_batch_tokens % seq:
        raise ConfigError(f"train.global_batch_tokens: {t.global_batch_tokens} is not a multiple of data.seq_len={seq}")
    samples = t.global_batch_tokens // seq
    per_pass = t.micro_batch_size * world_size
    if samples % per_pass:
        raise ConfigError(
            f"train.global_batch_tokens: {t.global_batch_tokens} tokens = {samples} sequences of "
            f"{seq}, not divisible by train.micro_batch_size={t.micro_batch_size} x {world_size} rank(s)"
        )
    return BatchPlan(
        seq_len=seq, global_samples=samples, micro_batch_size=t.micro_batch_size, world_size=world_size, rank=rank
    )


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor


def collate(dataset: Any, indices: Sequence[int], device: torch.device) -> Batch:
    """Stack items {"tokens", "labels", "loss_mask"} into [mbs, seq] tensors on `device`."""
    items = [dataset[i] for i in indices]
    pin = device.type == "cuda"

    def stack(key: str, dtype: torch.dtype) -> torch.Tensor:
        t = torch.stack([torch.as_tensor(item[key]) for item in items]).to(dtype)
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    return Batch(
        tokens=stack("tokens", torch.long),
        labels=stack("labels", torch.long),
        loss_mask=stack("loss_mask", torch.float32),
    )
