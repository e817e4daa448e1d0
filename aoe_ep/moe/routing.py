"""From a routing decision to rows grouped per expert, and back: the permute / unpermute of a token dispatcher.

Rows are expert-major with tokens ascending inside an expert (the order megatron-core's `permute` gives). Top-K and
expert choice know their row counts (T·K and n·C), so their grouping uses sorts and scatters only: no host
synchronisation and no data-dependent shape. Top-P, and any subset of the experts (an expert-parallel rank's own),
fall back to `nonzero`, whose size is data-dependent; the expert-parallel dispatchers need that count on the host
for their all-to-all splits anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from aoe_ep.moe.grouped import Groups


@dataclass(frozen=True)
class Decision:
    """Which experts process which token: mask_SE [S, n] (bool), plus the index form when the strategy gives one:
    topk_SK, each token's K experts in rank order (top-K); chosen_CE, each expert's C tokens (expert choice)."""

    mask_SE: torch.Tensor
    topk_SK: Optional[torch.Tensor] = None
    chosen_CE: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class GroupedRows:
    """Row m is token `token_index_M[m]` for expert `expert_index_M[m]` (an index into the experts grouped over);
    `groups` counts the rows of each expert."""

    token_index_M: torch.Tensor
    expert_index_M: torch.Tensor
    groups: Groups


def _from_topk(topk_SK: torch.Tensor, num_experts: int) -> GroupedRows:
    num_tokens, k = topk_SK.shape
    expert_M = topk_SK.reshape(-1)
    order_M = torch.sort(expert_M, stable=True).indices  # expert-major, tokens ascending (token-major input)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=topk_SK.device)
    counts_E.scatter_add_(0, expert_M, torch.ones_like(expert_M))
    return GroupedRows(
        token_index_M=torch.div(order_M, k, rounding_mode="floor"),
        expert_index_M=expert_M[order_M],
        groups=Groups(counts_E),
    )


def _from_chosen(chosen_CE: torch.Tensor) -> GroupedRows:
    capacity, num_experts = chosen_CE.shape
    token_EC = torch.sort(chosen_CE.t(), dim=1).values  # tokens ascending inside each expert
    expert_EC = torch.arange(num_experts, device=chosen_CE.device).view(-1, 1).expand(-1, capacity)
    counts_E = torch.full((num_experts,), capacity, dtype=torch.int64, device=chosen_CE.device)
    return GroupedRows(
        token_index_M=token_EC.reshape(-1), expert_index_M=expert_EC.reshape(-1), groups=Groups(counts_E)
    )


def _from_mask(mask_SE: torch.Tensor) -> GroupedRows:
    expert_M, token_M = torch.nonzero(mask_SE.t(), as_tuple=True)
    return GroupedRows(token_index_M=token_M, expert_index_M=expert_M, groups=Groups(mask_SE.sum(dim=0)))


def group_rows(decision: Decision, experts: Optional[slice] = None) -> GroupedRows:
    """The rows of `decision` for the experts in `experts` (all of them by default), expert indices relative to
    its start."""
    n = decision.mask_SE.shape[1]
    if experts is None or (experts.start in (None, 0) and experts.stop in (None, n)):
        if decision.topk_SK is not None:
            return _from_topk(decision.topk_SK, n)
        if decision.chosen_CE is not None:
            return _from_chosen(decision.chosen_CE)
        return _from_mask(decision.mask_SE)
    return _from_mask(decision.mask_SE[:, experts])


def row_gates(gates_SE: torch.Tensor, rows: GroupedRows, expert_offset: int = 0) -> torch.Tensor:
    """The gate of each row: g[token, expert] ([M], differentiable)."""
    return gates_SE[rows.token_index_M, rows.expert_index_M + expert_offset]


class _SumRows(torch.autograd.Function):
    """y[t] = Σ over the rows m with index[m] = t of rows[m]. Autograd's `index_add` keeps its source [M, D] for
    backward although the gradient is only dy[index]; this keeps the index alone."""

    @staticmethod
    def forward(ctx, rows_MD: torch.Tensor, index_M: torch.Tensor, num_out: int) -> torch.Tensor:
        ctx.save_for_backward(index_M)
        return rows_MD.new_zeros(num_out, rows_MD.shape[1]).index_add_(0, index_M, rows_MD)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_TD: torch.Tensor):
        (index_M,) = ctx.saved_tensors
        return dy_TD.index_select(0, index_M), None, None


def sum_rows(rows_MD: torch.Tensor, index_M: torch.Tensor, num_out: int) -> torch.Tensor:
    """[num_out, D]: row t is the sum of the rows m of `rows_MD` with `index_M[m] = t` (zeros where none)."""
    return _SumRows.apply(rows_MD, index_M, num_out)


def weighted_sum(
    out_MD: torch.Tensor, gate_M: torch.Tensor, token_index_M: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """y_t = Σ over the rows m of token t of gate_m · out_m; tokens without rows get zeros. Computed in the gates'
    precision (fp32) and returned in the rows' dtype."""
    weighted_MD = out_MD.to(gate_M.dtype) * gate_M.unsqueeze(1)
    return sum_rows(weighted_MD, token_index_M, num_tokens).to(out_MD.dtype)
