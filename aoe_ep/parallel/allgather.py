"""The `allgather` dispatcher: the AoE design card's path (DESIGN.md section 2).

Tokens are all-gathered over the EP group; each rank computes the low-rank cache of its own experts for all gathered
tokens (Wdown stays with its expert); the [T_all, n_local] norms are all-gathered so every rank holds the same
[T_all, n] score matrix and takes the same global decision; each rank runs its experts on the winning rows from its
own cache and weights them by their gates; an all-to-all returns, for every token with at least one winner on this
rank, the summed weighted row to the rank that owns the token.
"""

from __future__ import annotations

import torch

from aoe_ep.parallel.collectives import all_gather_rows, all_to_all_rows
from aoe_ep.parallel.local import DispatchState, ExpertRows, GroupDispatcher, TokenLayout, group_rows, weighted_sum


class AllGatherDispatcher(GroupDispatcher):
    """Selection, expert choice and global sums are the local dispatcher's: the scored rows are the whole EP batch."""

    def scored_tokens(self, x_TD: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return all_gather_rows(x_TD, layout.sizes, self.group, self.counter, "tokens")

    def all_expert_scores(self, s_SE: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if s_SE.shape[1] == self.num_experts:  # a replicated router or Self-Routing already scored every expert
            return s_SE
        s_ES = all_gather_rows(s_SE.t().contiguous(), [self.num_local] * self.ep_size, self.group, self.counter,
                               "norms")
        return s_ES.t()

    def own_rows(self, layout: TokenLayout) -> slice:
        return slice(layout.offset, layout.offset + layout.sizes[layout.rank])

    def dispatch(self, x_TD, xs_SD, cache_SEL, mask_SE, gates_SE, layout: TokenLayout):
        local = slice(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)
        mask_SL, gates_SL = mask_SE[:, local], gates_SE[:, local]
        x_MD, counts, token_index_M, cache_ML = group_rows(xs_SD, cache_SEL, mask_SL)
        rows = ExpertRows(x_MD=x_MD, counts=counts.tolist(), cache_ML=cache_ML)
        return rows, DispatchState(token_index_M, mask_SL, gates_SL, xs_SD.shape[0], route=(layout, mask_SE))

    def combine(self, out_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        layout, mask_SE = state.route
        partial_SD = weighted_sum(out_MD, state.token_index_M, state.mask_TE, state.gates_TE, state.num_tokens)
        # Send each owner the rows of its tokens that this rank's experts worked on (token order within an owner).
        send_index = torch.nonzero(state.mask_TE.any(dim=1)).flatten()
        bounds = torch.tensor([0] + list(torch.tensor(layout.sizes).cumsum(0)), device=send_index.device)
        send = [int(((send_index >= bounds[r]) & (send_index < bounds[r + 1])).sum()) for r in range(self.ep_size)]
        # Every rank holds the global decision, so each knows what it will receive without asking.
        own = self.own_rows(layout)
        mask_own_QE = mask_SE[own].view(-1, self.ep_size, self.num_local).any(dim=2)  # [T_own, EP]
        recv = mask_own_QE.sum(dim=0).tolist()
        recv_index = torch.cat([torch.nonzero(mask_own_QE[:, q]).flatten() for q in range(self.ep_size)])
        received = all_to_all_rows(partial_SD[send_index], send, recv, self.group, self.counter, "combine")
        y_TD = partial_SD.new_zeros(layout.sizes[layout.rank], partial_SD.shape[1])
        return y_TD.index_add(0, recv_index, received)
