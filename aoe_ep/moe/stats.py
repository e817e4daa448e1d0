"""Load statistics of one MoE layer over the (global) batch, returned as values for the trainer to log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from aoe_ep.moe.placement import Placement


@dataclass(frozen=True)
class BatchSums:
    """Detached sums over the EP group's batch from which the aux loss value and `LoadStats` are built; a parallel
    dispatcher produces them by all-reducing the local sums (or by summing a gathered matrix)."""

    tokens_per_expert: torch.Tensor
    probs_sum: torch.Tensor
    entropy_sum: torch.Tensor
    score_sum: torch.Tensor
    num_tokens: int

    @classmethod
    def of(cls, mask_TE: torch.Tensor, probs_TE: torch.Tensor, entropy_T: torch.Tensor, s_TE: torch.Tensor) -> "BatchSums":
        return cls(tokens_per_expert=mask_TE.sum(dim=0), probs_sum=probs_TE.detach().sum(dim=0),
                   entropy_sum=entropy_T.detach().sum(), score_sum=s_TE.detach().sum(dim=0),
                   num_tokens=mask_TE.shape[0])

    def stats(self) -> "LoadStats":
        return LoadStats.from_counts(self.tokens_per_expert, self.entropy_sum, self.score_sum, self.num_tokens)


@dataclass(frozen=True)
class LoadStats:
    """Per-layer statistics (AoE paper, Section 4.3).

    tokens_per_expert [E] (int64): tokens each expert processed; load [E]: the same normalised to sum 1;
    ent_load: −Σ load·log load (Eq. 7); ent_conf: mean per-token entropy of the softmaxed scores (Eq. 8);
    max_minus_min: max − min of `load`, this layer's term of the idle-time metric; score_mean [E]: mean score per
    expert over the batch (AoE: the activation norm of Fig. 4); num_tokens: tokens in the batch.
    """

    tokens_per_expert: torch.Tensor
    load: torch.Tensor
    ent_load: torch.Tensor
    ent_conf: torch.Tensor
    max_minus_min: torch.Tensor
    score_mean: torch.Tensor
    num_tokens: int

    @classmethod
    def from_counts(cls, tokens_per_expert: torch.Tensor, entropy_sum: torch.Tensor, score_sum: torch.Tensor,
                    num_tokens: int) -> "LoadStats":
        """Build from global sums, so that a parallel caller reduces three tensors and gets the same record."""
        counts = tokens_per_expert.detach().to(torch.int64)
        total = counts.sum()
        load = counts.double() / total.clamp_min(1)
        ent_load = -torch.special.xlogy(load, load).sum()
        denom = max(num_tokens, 1)
        return cls(tokens_per_expert=counts, load=load, ent_load=ent_load,
                   ent_conf=entropy_sum.detach().double() / denom,
                   max_minus_min=load.max() - load.min() if load.numel() else load.sum(),
                   score_mean=score_sum.detach().double() / denom, num_tokens=num_tokens)

    def device_load(self, num_devices: int, placement: Optional[Placement] = None) -> torch.Tensor:
        """Load per device when experts are placed over `num_devices` ranks by `placement` (contiguously when
        absent)."""
        if self.load.numel() % num_devices:
            raise ValueError(f"{self.load.numel()} experts cannot be split over {num_devices} devices")
        if placement is None:
            return self.load.view(num_devices, -1).sum(dim=1)
        if placement.num_devices != num_devices:
            raise ValueError(f"a placement over {placement.num_devices} devices does not describe {num_devices}")
        return placement.device_load(self.load)

    def device_max_minus_min(self, num_devices: int, placement: Optional[Placement] = None) -> torch.Tensor:
        device_load = self.device_load(num_devices, placement)
        return device_load.max() - device_load.min()


def idle_time(stats: Sequence[LoadStats], num_devices: int | None = None,
              placements: Optional[Sequence[Optional[Placement]]] = None) -> float:
    """The paper's idle-time metric: Σ over layers of (max − min) load, per expert or, given `num_devices`, per device
    (each layer's experts placed by `placements[i]`, contiguously when absent)."""
    if num_devices is None:
        return float(sum(s.max_minus_min for s in stats))
    placements = list(placements) if placements is not None else [None] * len(stats)
    return float(sum(s.device_max_minus_min(num_devices, p) for s, p in zip(stats, placements)))
