"""The `alltoall` dispatcher: communication-lean (docs/design.md section 2).

Two routes for the rows (the constructor's `combine`): "rank" (the default, `aoe_ep.parallel.rank_dispatch`) sends a
token once to each rank holding one of its experts and sums its expert outputs there; "pair", described below, sends
one row per (token, expert) pair and sums on the token's rank. Everything before the dispatch is the same for both.

The selector (AoE's Wdown of all experts, or the router) is replicated and scores this rank's tokens locally; only
global statistics cross ranks (one all-reduce of counts and sums; for expert choice, the probabilities); an
all-to-all with uneven splits sends each winning (token, expert) row, with its cached low-rank activation, to the
expert's rank, and a second all-to-all returns the expert outputs, which the owner weights and sums. Under an
expert placement the rows, grouped by global expert, are sent in placed order (rank 0's experts first) and put back
in global order on their return, so that the owner sums each token's rows in the same order whatever the placement.
"""

from __future__ import annotations

import torch

from aoe_ep.moe.dispatcher import DispatchState, ExpertRows, TokenLayout
from aoe_ep.moe.grouped import Groups
from aoe_ep.moe.routing import Decision, group_rows, row_gates, weighted_sum
from aoe_ep.moe.selection import expert_capacity, expert_choice_mask
from aoe_ep.moe.stats import BatchSums
from aoe_ep.packing import pack
from aoe_ep.parallel.collectives import all_gather_rows, all_reduce_sum, all_to_all_counts, all_to_all_rows
from aoe_ep.parallel.comm_model import COMBINES
from aoe_ep.parallel.group import GroupDispatcher
from aoe_ep.parallel.rank_dispatch import combine_on_rank, dispatch_by_rank, placed_rows, regroup

# The `BatchSums` fields summed over the EP group (the last two under threshold selection only) and those that count.
SUMMED = (
    "tokens_per_expert",
    "probs_sum",
    "entropy_sum",
    "score_sum",
    "margin_sum",
    "margin_tokens",
    "gate_sum",
    "token_balance_sum",
)
COUNTS = ("tokens_per_expert", "margin_tokens")


class AllToAllDispatcher(GroupDispatcher):
    def __init__(self, group, num_experts: int, combine: str = "rank"):
        if combine not in COMBINES:
            raise ValueError(f"alltoall dispatcher: combine must be one of {COMBINES}, got {combine!r}")
        super().__init__(group, num_experts)
        self.combine_on = combine

    def expert_choice(self, probs_SE: torch.Tensor, capacity_factor: float, layout: TokenLayout) -> Decision:
        """Experts rank tokens over the whole EP batch, so the probabilities (n per token) are all-gathered."""
        probs_all = all_gather_rows(probs_SE.detach(), layout.sizes, self.group, self.counter, "probs")
        mask_all = expert_choice_mask(probs_all, expert_capacity(layout.total, self.num_experts, capacity_factor))
        return Decision(mask_SE=mask_all[layout.offset : layout.offset + layout.sizes[layout.rank]])

    def global_sums(
        self, mask_SE, probs_SE, entropy_S, s_SE, layout: TokenLayout, margin_S=None, g_SE=None
    ) -> BatchSums:
        local = BatchSums.of(mask_SE, probs_SE, entropy_S, s_SE, margin_S, g_SE)
        fields = {name: getattr(local, name) for name in SUMMED if getattr(local, name) is not None}
        packed, packing = pack(fields)
        total = packing.unpack(all_reduce_sum(packed, self.group, self.counter, "stats"))
        return BatchSums(
            num_tokens=layout.total,
            **{name: total[name].round().long() if name in COUNTS else total.get(name) for name in SUMMED},
        )

    def dispatch(self, x_TD, xs_SD, scores, decision, layout: TokenLayout):
        if self.combine_on == "rank":
            return dispatch_by_rank(self, x_TD, scores, decision)
        rows = group_rows(decision)
        x_MD = x_TD.index_select(0, rows.token_index_M)
        s_SX, cache_MR = scores.attach(rows, x_MD)
        payload_MW = x_MD if cache_MR is None else torch.cat([x_MD, cache_MR.to(x_MD.dtype)], dim=1)
        counts_P, perm_M = rows.groups.counts_E, None
        if self._order is not None:  # rows to each rank's experts in turn, as the placement lists them
            order = self._index("order", x_TD.device)
            counts_P, perm_M = counts_P.index_select(0, order), placed_rows(rows.groups.counts_E, order)
            payload_MW = payload_MW.index_select(0, perm_M)
        send_QX = counts_P.view(self.ep_size, self.num_local)  # rows for rank r's local expert e
        recv_QX = all_to_all_counts(send_QX, self.group, self.counter)  # rows from rank q for my expert e
        send, recv_sizes_QX = send_QX.sum(dim=1).tolist(), recv_QX.tolist()
        recv = [sum(row) for row in recv_sizes_QX]
        received_NW = all_to_all_rows(payload_MW, send, recv, self.group, self.counter, "dispatch")
        # Received rows are grouped (source rank, expert); the experts want them grouped (expert, source rank).
        grouped_NW = regroup(received_NW, recv_sizes_QX)
        per_expert = [sum(row[e] for row in recv_sizes_QX) for e in range(self.num_local)]
        groups = Groups(torch.tensor(per_expert, dtype=torch.int64, device=x_TD.device), _host=per_expert)
        d = x_TD.shape[1]
        expert_rows = ExpertRows(
            x_MD=grouped_NW[:, :d], groups=groups, cache_MR=None if cache_MR is None else grouped_NW[:, d:]
        )
        state = DispatchState(rows, x_TD.shape[0], route=(recv_sizes_QX, send, recv, perm_M))
        return expert_rows, state, s_SX

    def combine(self, out_MD: torch.Tensor, gates_SE: torch.Tensor, state: DispatchState) -> torch.Tensor:
        if self.combine_on == "rank":
            return combine_on_rank(self, out_MD, gates_SE, state)
        recv_sizes_QX, send, recv, perm_M = state.route
        sizes_XQ = [list(col) for col in zip(*recv_sizes_QX)] if recv_sizes_QX else []
        back_MD = regroup(out_MD, sizes_XQ)
        returned_MD = all_to_all_rows(back_MD, recv, send, self.group, self.counter, "combine")
        if perm_M is not None:  # back to rows grouped by global expert
            inverse_M = torch.empty_like(perm_M)
            inverse_M[perm_M] = torch.arange(perm_M.numel(), device=perm_M.device)
            returned_MD = returned_MD.index_select(0, inverse_M)
        return weighted_sum(returned_MD, row_gates(gates_SE, state.rows), state.rows.token_index_M, state.num_tokens)
