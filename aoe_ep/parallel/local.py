"""The dispatcher that moves nothing: every expert is local, rows are only permuted into per-expert groups.

Phases as in Megatron-Core's token dispatchers: permute → (communicate) → compute → (communicate) → unpermute.
Permutation reuses megatron-core's `permute` / `unpermute` (expert-major, tokens ascending within an expert).
The expert-parallel dispatchers (`allgather.py`, `alltoall.py`) implement the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import permute, unpermute

from aoe_ep.moe.selection import expert_capacity, expert_choice_mask
from aoe_ep.moe.stats import BatchSums
from aoe_ep.parallel.collectives import CommCounter, all_gather_sizes


@dataclass(frozen=True)
class TokenLayout:
    """How the EP group's tokens are laid out this step: rows per rank, this rank's index. Made once per forward."""

    sizes: tuple[int, ...]
    rank: int

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class ExpertRows:
    """What the experts compute on: x_MD grouped by local expert, `counts[e]` rows for local expert e, and the
    low-rank cache row of each (token, expert) pair (None unless the scorer made one)."""

    x_MD: torch.Tensor
    counts: list[int]
    cache_ML: Optional[torch.Tensor]


@dataclass(frozen=True)
class DispatchState:
    """What combine needs to put expert outputs back: the token of each row, the local mask and gates, and the
    dispatcher's own routing record (None for the local dispatcher)."""

    token_index_M: torch.Tensor
    mask_TE: torch.Tensor
    gates_TE: torch.Tensor
    num_tokens: int
    route: object = None


def group_rows(x_TD: torch.Tensor, cache_TEL: Optional[torch.Tensor], mask_TE: torch.Tensor):
    """Permute tokens into expert-major rows (megatron-core `permute`), with the matching cache rows."""
    x_MD, _, token_index_M = permute(x_TD, mask_TE)
    counts_E = mask_TE.sum(dim=0)
    cache_ML = None
    if cache_TEL is not None:
        expert_index_M = torch.repeat_interleave(torch.arange(mask_TE.shape[1], device=x_TD.device), counts_E)
        cache_ML = cache_TEL[token_index_M, expert_index_M]
    return x_MD, counts_E, token_index_M, cache_ML


def weighted_sum(out_MD: torch.Tensor, token_index_M: torch.Tensor, mask_TE: torch.Tensor, gates_TE: torch.Tensor,
                 num_tokens: int) -> torch.Tensor:
    """y_t = Σ_i g_ti · E_i(x_t) over the rows of each token (megatron-core `unpermute`)."""
    restore_shape = torch.Size((num_tokens, out_MD.shape[1]))
    return unpermute(out_MD, token_index_M, restore_shape, probs=gates_TE, routing_map=mask_TE)


class LocalDispatcher:
    """Single device: the reference every expert-parallel dispatcher must reproduce."""

    ep_size = 1
    ep_rank = 0

    def __init__(self) -> None:
        self.counter = CommCounter()

    def layout(self, x_TD: torch.Tensor) -> TokenLayout:
        return TokenLayout(sizes=(x_TD.shape[0],), rank=0)

    def scored_tokens(self, x_TD: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The tokens the scorer runs on (all of the EP group's under `allgather`)."""
        return x_TD

    def all_expert_scores(self, s_SE: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Scores over all n experts for the scored tokens (AoE under `allgather` gathers the other ranks' columns)."""
        return s_SE

    def own_rows(self, layout: TokenLayout) -> slice:
        """Rows of the scored tokens that are this rank's own tokens."""
        return slice(None)

    def expert_choice(self, probs_SE: torch.Tensor, capacity_factor: float, layout: TokenLayout) -> torch.Tensor:
        n = probs_SE.shape[1]
        return expert_choice_mask(probs_SE, expert_capacity(probs_SE.shape[0], n, capacity_factor))

    def global_sums(self, mask_SE, probs_SE, entropy_S, s_SE, layout: TokenLayout) -> BatchSums:
        return BatchSums.of(mask_SE, probs_SE, entropy_S, s_SE)

    def dispatch(self, x_TD, xs_SD, cache_SEL, mask_SE, gates_SE, layout: TokenLayout) -> tuple[ExpertRows, DispatchState]:
        x_MD, counts_E, token_index_M, cache_ML = group_rows(x_TD, cache_SEL, mask_SE)
        rows = ExpertRows(x_MD=x_MD, counts=counts_E.tolist(), cache_ML=cache_ML)
        return rows, DispatchState(token_index_M, mask_SE, gates_SE, x_TD.shape[0])

    def combine(self, out_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return weighted_sum(out_MD, state.token_index_M, state.mask_TE, state.gates_TE, state.num_tokens)


class GroupDispatcher(LocalDispatcher):
    """Common ground of the expert-parallel dispatchers: an explicit EP group, n/EP local experts, and the token
    layout every forward starts with (one all-gather of the row counts)."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        super().__init__()
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size

    def layout(self, x_TD: torch.Tensor) -> TokenLayout:
        return TokenLayout(tuple(all_gather_sizes(x_TD.shape[0], self.group, self.counter, x_TD.device)), self.ep_rank)
