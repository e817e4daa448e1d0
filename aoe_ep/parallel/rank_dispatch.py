"""Dispatch once per (token, rank), combine on the expert's rank: the `alltoall` dispatcher's default route.

A token row travels once to every rank that holds at least one of its chosen experts, followed by flags saying which
of that rank's experts it goes to, 8 to a column as an integer below 256 (exact in the rows' dtype from bf16 up, so
that one all-to-all carries both; the backward returns the gradient of the token row alone). What belongs to a (token,
expert) pair travels in the order the
experts group their rows, (local expert, token ascending): AoE's cache row of the pair at dispatch, its gate at
combine. The rank runs its experts on the pairs, weighs each output by its gate and sums a token's weighted outputs
there, so one row per (token, rank) goes back; the owner adds a token's returned rows. The backward mirrors each step:
the gradient of a combined row goes back once, those of the gates and cache rows once per pair.

Row order: the owner sends the rows for rank q in token order, rank 0's first; the pairs for rank q grouped by its
local expert (the layer's placement decides which global experts those are), tokens ascending. The receiving rank
reads its pairs expert-major, then source rank, then token: the (expert, source) regrouping of the pair path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from aoe_ep.moe.dispatcher import CommCounter, DispatchState, ExpertRows
from aoe_ep.moe.grouped import Groups
from aoe_ep.moe.routing import group_rows, row_gates, sum_rows, weighted_sum
from aoe_ep.parallel.collectives import all_to_all_counts, all_to_all_rows
from aoe_ep.parallel.comm_model import EXPERT_BITS, expert_columns


def pack_experts(flags_UX: torch.Tensor) -> torch.Tensor:
    """Boolean flags [U, X] -> int64 codes [U, ⌈X/8⌉], flag j of a row as bit j % 8 of its column j // 8."""
    rows, n = flags_UX.shape
    columns = expert_columns(n)
    padded = flags_UX.new_zeros(rows, columns * EXPERT_BITS)
    padded[:, :n] = flags_UX
    bits = torch.arange(EXPERT_BITS, device=flags_UX.device)
    return (padded.view(rows, columns, EXPERT_BITS).long() << bits).sum(dim=2)


def unpack_experts(codes_NC: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_experts`: codes (any dtype holding the integers exactly) -> boolean flags [N, n]."""
    bits = torch.arange(EXPERT_BITS, device=codes_NC.device)
    flags = (codes_NC.round().long().unsqueeze(2) >> bits) & 1
    return flags.view(codes_NC.shape[0], codes_NC.shape[1] * EXPERT_BITS)[:, :n].bool()


def placed_rows(counts_E: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Row index that reorders rows grouped by expert (counts_E of each, expert 0 first) to the expert order
    `order` (a permutation of the experts), keeping each expert's rows in their order."""
    counts_P = counts_E.index_select(0, order)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    starts_P = torch.cumsum(counts_P, 0) - counts_P
    total = int(counts_E.sum())
    slot_M = torch.repeat_interleave(torch.arange(order.numel(), device=order.device), counts_P, output_size=total)
    return starts_E.index_select(0, order)[slot_M] + torch.arange(total, device=order.device) - starts_P[slot_M]


def regroup(x_MW: torch.Tensor, sizes_AB: list[list[int]]) -> torch.Tensor:
    """Rows in consecutive chunks ordered (a, b), chunk (a, b) of sizes_AB[a][b] rows, reordered to (b, a)."""
    chunks = torch.split(x_MW, [n for row in sizes_AB for n in row])
    width = len(sizes_AB[0]) if sizes_AB else 0
    return torch.cat([chunks[a * width + b] for b in range(width) for a in range(len(sizes_AB))])


def _exchange(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=list(recv), input_split_sizes=list(send), group=group
    )
    return out


def _remote(counts: Sequence[int], rank: int) -> int:
    return sum(n for r, n in enumerate(counts) if r != rank)


class _RowsWithExperts(torch.autograd.Function):
    """Token rows [U, d] and their expert codes [U, C] (`pack_experts`) in one all-to-all; backward returns the
    rows' gradient only (the codes are routing metadata)."""

    @staticmethod
    def forward(ctx, x_UD, codes_UC, send, recv, group, counter: CommCounter, name: str):
        ctx.send, ctx.recv, ctx.group, ctx.counter, ctx.name = send, recv, group, counter, name
        ctx.d = x_UD.shape[1]
        payload_UW = torch.cat([x_UD, codes_UC.to(x_UD.dtype)], dim=1)
        rank = dist.get_rank(group)
        counter.add(name, "fwd", _remote(send, rank) * payload_UW.shape[1] * payload_UW.element_size())
        return _exchange(payload_UW, send, recv, group)

    @staticmethod
    def backward(ctx, grad_NW):
        grad_ND = grad_NW[:, : ctx.d].contiguous()
        rank = dist.get_rank(ctx.group)
        ctx.counter.add(ctx.name, "bwd", _remote(ctx.recv, rank) * ctx.d * grad_ND.element_size())
        return _exchange(grad_ND, ctx.recv, ctx.send, ctx.group), None, None, None, None, None, None


@dataclass(frozen=True)
class RankRoute:
    """The routing record of one forward: on the owner side, the token of each row it sent (destination-major,
    tokens ascending) and the permutation of its pairs into placed order (None under the contiguous placement);
    row and pair counts per rank both ways; on the expert side, the received row of each local pair (expert-major)
    and the pairs per (source rank, local expert)."""

    token_index_U: torch.Tensor
    perm_M: Optional[torch.Tensor]
    send_rows: list[int]
    recv_rows: list[int]
    send_pairs: list[int]
    recv_pairs_QX: list[list[int]]
    row_index_P: torch.Tensor


def dispatch_by_rank(
    dispatcher, x_TD: torch.Tensor, scores, decision
) -> tuple[ExpertRows, DispatchState, torch.Tensor]:
    """`Dispatcher.dispatch` of the per-(token, rank) route; `dispatcher` is an `AllToAllDispatcher`."""
    group, counter = dispatcher.group, dispatcher.counter
    ep, n_local = dispatcher.ep_size, dispatcher.num_local
    rows = group_rows(decision)
    s_SX, cache_MR = scores.attach(rows, x_TD.index_select(0, rows.token_index_M))
    mask_SQX = dispatcher.placed(decision.mask_SE).view(-1, ep, n_local)
    hit_QS = mask_SQX.any(dim=2).t()
    dest_U, token_U = torch.nonzero(hit_QS, as_tuple=True)  # destination-major, tokens ascending
    send_rows_Q = hit_QS.sum(dim=1)
    recv_rows_Q = all_to_all_counts(send_rows_Q.view(ep, 1), group, counter).view(ep)
    send_rows, recv_rows = send_rows_Q.tolist(), recv_rows_Q.tolist()
    received_NW = _RowsWithExperts.apply(
        x_TD.index_select(0, token_U),
        pack_experts(mask_SQX[token_U, dest_U]),
        send_rows,
        recv_rows,
        group,
        counter,
        "dispatch",
    )
    d = x_TD.shape[1]
    experts_NX = unpack_experts(received_NW[:, d:].detach(), n_local)
    _, row_P = torch.nonzero(experts_NX.t(), as_tuple=True)  # expert-major, received rows ascending
    recv_pairs_QX = torch.stack([c.sum(dim=0) for c in torch.split(experts_NX, recv_rows)]).tolist()
    send_pairs = mask_SQX.sum(dim=(0, 2)).tolist()
    perm_M = None
    if dispatcher._order is not None:  # pairs grouped by global expert -> each rank's local experts in turn
        perm_M = placed_rows(rows.groups.counts_E, dispatcher._index("order", x_TD.device))
    cache_PR = None
    if cache_MR is not None:
        cache_MR = cache_MR.to(x_TD.dtype)
        sent_MR = cache_MR if perm_M is None else cache_MR.index_select(0, perm_M)
        cache_PR = regroup(
            all_to_all_rows(sent_MR, send_pairs, [sum(r) for r in recv_pairs_QX], group, counter, "cache"),
            recv_pairs_QX,
        )
    per_expert = experts_NX.sum(dim=0)
    groups = Groups(per_expert, _host=per_expert.tolist())
    x_PD = received_NW[:, :d].index_select(0, row_P)
    route = RankRoute(token_U, perm_M, send_rows, recv_rows, send_pairs, recv_pairs_QX, row_P)
    return ExpertRows(x_MD=x_PD, groups=groups, cache_MR=cache_PR), DispatchState(rows, x_TD.shape[0], route), s_SX


def combine_on_rank(dispatcher, out_PD: torch.Tensor, gates_SE: torch.Tensor, state: DispatchState) -> torch.Tensor:
    """`Dispatcher.combine` of the per-(token, rank) route: the gates go to the experts' ranks, each rank returns
    one gated sum per (token, rank), the owner adds them per token (in the gates' precision)."""
    group, counter, route = dispatcher.group, dispatcher.counter, state.route
    gate_M = row_gates(gates_SE, state.rows)
    if route.perm_M is not None:
        gate_M = gate_M.index_select(0, route.perm_M)
    recv_pairs = [sum(r) for r in route.recv_pairs_QX]
    gate_P = regroup(
        all_to_all_rows(gate_M.view(-1, 1), route.send_pairs, recv_pairs, group, counter, "gates"), route.recv_pairs_QX
    ).view(-1)
    combined_ND = weighted_sum(out_PD, gate_P, route.row_index_P, sum(route.recv_rows))
    back_UD = all_to_all_rows(combined_ND, route.recv_rows, route.send_rows, group, counter, "combine")
    return sum_rows(back_UD.to(gate_P.dtype), route.token_index_U, state.num_tokens).to(out_PD.dtype)
