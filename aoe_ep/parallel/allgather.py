"""The `allgather` dispatcher: the AoE design card's path (docs/design.md section 2).

Tokens are all-gathered over the EP group; each rank computes the low-rank cache of its own experts for all gathered
tokens (Wdown stays with its expert); the [T_all, n_local] norms are all-gathered so every rank holds the same
[T_all, n] score matrix and takes the same global decision; each rank runs its experts on the winning rows from its
own cache and weights them by their gates; an all-to-all returns, for every token with at least one winner on this
rank, the summed weighted row to the rank that owns the token. The row counts of that all-to-all are exchanged
(not derived from this rank's copy of the decision), so ranks that disagree get an error instead of a hang.
Under an expert placement the gathered norms arrive in placed order and go back to global order before the decision;
a rank's experts are the block of placed columns it holds.
"""

from __future__ import annotations

import torch

from aoe_ep.moe.dispatcher import DispatchState, ExpertRows, TokenLayout
from aoe_ep.moe.routing import Decision, group_rows, row_gates, sum_rows, weighted_sum
from aoe_ep.parallel.collectives import all_gather_rows, all_to_all_counts, all_to_all_rows, attach_gathered
from aoe_ep.parallel.group import GroupDispatcher


class AllGatherDispatcher(GroupDispatcher):
    """Selection, expert choice and global sums are the local dispatcher's: the scored rows are the whole EP batch."""

    def scored_tokens(self, x_TD: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return all_gather_rows(x_TD, layout.sizes, self.group, self.counter, "tokens")

    def _sharded(self, s_SX: torch.Tensor) -> bool:
        return s_SX.shape[1] != self.num_experts  # a replicated router or Self-Routing scored every expert already

    def all_expert_scores(self, s_SX: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if not self._sharded(s_SX):
            return s_SX.detach()
        with torch.no_grad():
            s_PS = all_gather_rows(
                s_SX.detach().t().contiguous(), [self.num_local] * self.ep_size, self.group, self.counter, "norms"
            )
        return self.unplaced(s_PS.t())

    def attach_scores(self, s_SX: torch.Tensor, s_SE: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if not self._sharded(s_SX):
            return s_SX
        return self.unplaced(
            attach_gathered(
                s_SX.t().contiguous(),
                self.placed(s_SE).t(),
                [self.num_local] * self.ep_size,
                self.group,
                self.counter,
                "norms",
            ).t()
        )

    def own_rows(self, layout: TokenLayout) -> slice:
        return slice(layout.offset, layout.offset + layout.sizes[layout.rank])

    def dispatch(self, x_TD, xs_SD, scores, decision, layout: TokenLayout):
        mask_SP = self.placed(decision.mask_SE)
        rows = group_rows(Decision(mask_SE=mask_SP), self.local_experts)
        x_MD = xs_SD.index_select(0, rows.token_index_M)
        s_SX, cache_MR = scores.attach(rows, x_MD)
        state = DispatchState(rows, xs_SD.shape[0], route=(layout, mask_SP))
        return ExpertRows(x_MD, rows.groups, cache_MR), state, s_SX

    def combine(self, out_MD: torch.Tensor, gates_SE: torch.Tensor, state: DispatchState) -> torch.Tensor:
        layout, mask_SP = state.route
        rows = state.rows
        partial_SD = weighted_sum(
            out_MD,
            row_gates(self.placed(gates_SE), rows, self.local_experts.start),
            rows.token_index_M,
            state.num_tokens,
        )
        # Send each owner the rows of its tokens that this rank's experts worked on (token order within an owner).
        worked_S = mask_SP[:, self.local_experts].any(dim=1)
        send_index = torch.nonzero(worked_S).flatten()
        send_R1 = torch.stack([chunk.sum() for chunk in torch.split(worked_S, list(layout.sizes))]).view(-1, 1)
        recv_R1 = all_to_all_counts(send_R1, self.group, self.counter)
        send, recv = send_R1.flatten().tolist(), recv_R1.flatten().tolist()
        # Where the received rows go, from this rank's copy of the decision; it must agree with what was sent.
        own = self.own_rows(layout)
        from_rank_TQ = mask_SP[own].view(-1, self.ep_size, self.num_local).any(dim=2)
        recv_index = torch.nonzero(from_rank_TQ.t())[:, 1]
        if recv_index.numel() != sum(recv):
            raise RuntimeError(
                f"allgather dispatcher: rank {self.ep_rank} expects {recv_index.numel()} combined rows "
                f"but the other ranks send {sum(recv)}: the ranks disagree on the routing decision"
            )
        received = all_to_all_rows(
            partial_SD.index_select(0, send_index), send, recv, self.group, self.counter, "combine"
        )
        return sum_rows(received, recv_index, layout.sizes[layout.rank])
