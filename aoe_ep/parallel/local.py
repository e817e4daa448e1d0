"""The dispatcher that moves nothing: every expert is local, rows are only permuted into per-expert groups.

Phases as in Megatron-Core's token dispatchers: permute → (communicate) → compute → (communicate) → unpermute.
Permutation reuses megatron-core's `permute` / `unpermute` (expert-major, tokens ascending within an expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import permute, unpermute


@dataclass(frozen=True)
class ExpertRows:
    """What the experts compute on: x_MD grouped by expert, `counts[e]` rows for local expert e, and the AoE cache
    row of each (token, expert) pair (None for the other scorers)."""

    x_MD: torch.Tensor
    counts: list[int]
    cache_ML: Optional[torch.Tensor]


@dataclass(frozen=True)
class DispatchState:
    """What combine needs to put expert outputs back: the token of each row, the mask and gates, the output shape."""

    token_index_M: torch.Tensor
    mask_TE: torch.Tensor
    gates_TE: torch.Tensor
    num_tokens: int


class LocalDispatcher:
    """Single device: the reference every expert-parallel dispatcher must reproduce."""

    def dispatch(self, x_TD: torch.Tensor, cache_TEL: Optional[torch.Tensor], mask_TE: torch.Tensor,
                 gates_TE: torch.Tensor) -> tuple[ExpertRows, DispatchState]:
        x_MD, _, token_index_M = permute(x_TD, mask_TE)
        counts_E = mask_TE.sum(dim=0)
        cache_ML = None
        if cache_TEL is not None:
            expert_index_M = torch.repeat_interleave(torch.arange(mask_TE.shape[1], device=x_TD.device), counts_E)
            cache_ML = cache_TEL[token_index_M, expert_index_M]
        rows = ExpertRows(x_MD=x_MD, counts=counts_E.tolist(), cache_ML=cache_ML)
        return rows, DispatchState(token_index_M, mask_TE, gates_TE, x_TD.shape[0])

    def combine(self, out_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """y_t = Σ_i g_ti · E_i(x_t): weight each row by its gate and sum the rows of each token."""
        restore_shape = torch.Size((state.num_tokens, out_MD.shape[1]))
        return unpermute(out_MD, state.token_index_M, restore_shape, probs=state.gates_TE, routing_map=state.mask_TE)
