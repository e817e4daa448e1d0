"""Load statistics of one MoE layer over the (global) batch, returned as values for the trainer to log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from aoe_ep.moe.placement import Placement


def selection_margin(s_TE: torch.Tensor, mask_TE: torch.Tensor) -> torch.Tensor:
    """Per token, how decisive its selection was: its lowest selected score minus its highest unselected one, i.e.
    the K-th minus the (K+1)-th highest score under top-K (0 on a tie), and under top-P the last expert of the kept
    prefix minus the first one left out (probabilities rank like scores). NaN for a token with no selected or no
    unselected expert, which has no margin. Float64, no gradient."""
    s_TE = s_TE.detach().double()
    lowest_in_T = s_TE.masked_fill(~mask_TE, float("inf")).amin(dim=1)
    highest_out_T = s_TE.masked_fill(mask_TE, float("-inf")).amax(dim=1)
    has_T = mask_TE.any(dim=1) & ~mask_TE.all(dim=1)
    return torch.where(has_T, lowest_in_T - highest_out_T, torch.full_like(lowest_in_T, float("nan")))


@dataclass(frozen=True)
class BatchSums:
    """Detached sums over the EP group's batch from which the aux loss value and `LoadStats` are built; a parallel
    dispatcher produces them by all-reducing the local sums (or by summing a gathered matrix). margin_sum and
    margin_tokens: Σ of `selection_margin` over the tokens that have one, and their count (0-dim float64 / int64;
    both zero where the layer records no margin). Under threshold selection only (else None): gate_sum [n], Σ_x G_i,
    and token_balance_sum, Σ_x mean_i(f_i)·mean_j(G_j), the sums of its balancing loss."""

    tokens_per_expert: torch.Tensor
    probs_sum: torch.Tensor
    entropy_sum: torch.Tensor
    score_sum: torch.Tensor
    num_tokens: int
    margin_sum: torch.Tensor
    margin_tokens: torch.Tensor
    gate_sum: Optional[torch.Tensor] = None
    token_balance_sum: Optional[torch.Tensor] = None

    @classmethod
    def of(
        cls,
        mask_TE: torch.Tensor,
        probs_TE: torch.Tensor,
        entropy_T: torch.Tensor,
        s_TE: torch.Tensor,
        margin_T: Optional[torch.Tensor] = None,
        g_TE: Optional[torch.Tensor] = None,
    ) -> BatchSums:
        if margin_T is None:
            margin_T = s_TE.new_empty(0, dtype=torch.float64)
        gate_sum = token_balance_sum = None
        if g_TE is not None:
            g_TE = g_TE.detach()
            gate_sum = g_TE.sum(dim=0)
            token_balance_sum = (mask_TE.to(g_TE.dtype).mean(dim=1) * g_TE.mean(dim=1)).sum()
        return cls(
            tokens_per_expert=mask_TE.sum(dim=0),
            probs_sum=probs_TE.detach().sum(dim=0),
            entropy_sum=entropy_T.detach().sum(),
            score_sum=s_TE.detach().sum(dim=0),
            num_tokens=mask_TE.shape[0],
            margin_sum=margin_T.double().nansum(),
            margin_tokens=(~torch.isnan(margin_T)).sum(),
            gate_sum=gate_sum,
            token_balance_sum=token_balance_sum,
        )

    def stats(self) -> LoadStats:
        return LoadStats.from_counts(
            self.tokens_per_expert,
            self.entropy_sum,
            self.score_sum,
            self.num_tokens,
            self.margin_sum,
            self.margin_tokens,
        )


@dataclass(frozen=True)
class LoadStats:
    """Per-layer statistics (AoE paper, Section 4.3).

    tokens_per_expert [E] (int64): tokens each expert processed; load [E]: the same normalised to sum 1;
    ent_load: −Σ load·log load (Eq. 7); ent_conf: mean per-token entropy of the softmaxed scores (Eq. 8);
    max_minus_min: max − min of `load`, this layer's term of the idle-time metric; score_mean [E]: mean score per
    expert over the batch (AoE: the activation norm of Fig. 4); num_tokens: tokens in the batch; score_margin: mean
    `selection_margin` over the margin_tokens tokens that have one (0-dim; 0 where margin_tokens is 0: expert choice,
    or top-K with K = n).
    """

    tokens_per_expert: torch.Tensor
    load: torch.Tensor
    ent_load: torch.Tensor
    ent_conf: torch.Tensor
    max_minus_min: torch.Tensor
    score_mean: torch.Tensor
    num_tokens: int
    score_margin: torch.Tensor
    margin_tokens: torch.Tensor

    @classmethod
    def from_counts(
        cls,
        tokens_per_expert: torch.Tensor,
        entropy_sum: torch.Tensor,
        score_sum: torch.Tensor,
        num_tokens: int,
        margin_sum: Optional[torch.Tensor] = None,
        margin_tokens: Optional[torch.Tensor] = None,
    ) -> LoadStats:
        """Build from global sums, so that a parallel caller reduces a few tensors and gets the same record (no
        margin sums: no margin recorded)."""
        counts = tokens_per_expert.detach().to(torch.int64)
        margin_sum = score_sum.new_zeros((), dtype=torch.float64) if margin_sum is None else margin_sum.double()
        margin_tokens = counts.new_zeros(()) if margin_tokens is None else margin_tokens.to(torch.int64)
        total = counts.sum()
        load = counts.double() / total.clamp_min(1)
        ent_load = -torch.special.xlogy(load, load).sum()
        denom = max(num_tokens, 1)
        return cls(
            tokens_per_expert=counts,
            load=load,
            ent_load=ent_load,
            ent_conf=entropy_sum.detach().double() / denom,
            max_minus_min=load.max() - load.min() if load.numel() else load.sum(),
            score_mean=score_sum.detach().double() / denom,
            num_tokens=num_tokens,
            score_margin=margin_sum.detach() / margin_tokens.clamp_min(1),
            margin_tokens=margin_tokens,
        )

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


def idle_time(
    stats: Sequence[LoadStats],
    num_devices: int | None = None,
    placements: Optional[Sequence[Optional[Placement]]] = None,
) -> float:
    """The paper's idle-time metric: Σ over layers of (max − min) load, per expert or, given `num_devices`, per device
    (each layer's experts placed by `placements[i]`, contiguously when absent)."""
    if num_devices is None:
        return float(sum(s.max_minus_min for s in stats))
    placements = list(placements) if placements is not None else [None] * len(stats)
    return float(sum(s.device_max_minus_min(num_devices, p) for s, p in zip(stats, placements)))
