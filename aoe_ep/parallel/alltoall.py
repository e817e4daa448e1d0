"""The `alltoall` dispatcher: communication-lean (DESIGN.md section 2).

The selector (AoE's Wdown of all experts, or the router) is replicated and scores this rank's tokens locally; only
global statistics cross ranks (one all-reduce of counts and sums; for expert choice, the probabilities); an
all-to-all with uneven splits sends each winning (token, expert) row, with its cached low-rank activation, to the
expert's rank, and a second all-to-all returns the expert outputs, which the owner weights and sums.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs

from aoe_ep.moe.selection import expert_capacity, expert_choice_mask
from aoe_ep.moe.stats import BatchSums
from aoe_ep.parallel.collectives import all_gather_rows, all_reduce_sum, all_to_all_counts, all_to_all_rows
from aoe_ep.parallel.local import DispatchState, ExpertRows, GroupDispatcher, TokenLayout, group_rows, weighted_sum


class AllToAllDispatcher(GroupDispatcher):
    def expert_choice(self, probs_SE: torch.Tensor, capacity_factor: float, layout: TokenLayout) -> torch.Tensor:
        """Experts rank tokens over the whole EP batch, so the probabilities (n per token) are all-gathered."""
        probs_all = all_gather_rows(probs_SE.detach(), layout.sizes, self.group, self.counter, "probs")
        mask_all = expert_choice_mask(probs_all, expert_capacity(layout.total, self.num_experts, capacity_factor))
        return mask_all[layout.offset: layout.offset + layout.sizes[layout.rank]]

    def global_sums(self, mask_SE, probs_SE, entropy_S, s_SE, layout: TokenLayout) -> BatchSums:
        local = BatchSums.of(mask_SE, probs_SE, entropy_S, s_SE)
        n = self.num_experts
        packed = torch.cat([local.tokens_per_expert.double(), local.probs_sum.double(), local.score_sum.double(),
                            local.entropy_sum.double().view(1)])
        total = all_reduce_sum(packed, self.group, self.counter, "stats")
        return BatchSums(tokens_per_expert=total[:n].round().long(), probs_sum=total[n:2 * n],
                         entropy_sum=total[3 * n], score_sum=total[2 * n:3 * n], num_tokens=layout.total)

    def dispatch(self, x_TD, xs_SD, cache_SEL, mask_SE, gates_SE, layout: TokenLayout):
        x_MD, counts_E, token_index_M, cache_ML = group_rows(x_TD, cache_SEL, mask_SE)
        payload_MX = x_MD if cache_ML is None else torch.cat([x_MD, cache_ML], dim=1)
        send_RL = counts_E.view(self.ep_size, self.num_local)     # rows for rank r's local expert e
        recv_QL = all_to_all_counts(send_RL, self.group, self.counter)  # rows from rank q for my expert e
        send, recv = send_RL.sum(dim=1).tolist(), recv_QL.sum(dim=1).tolist()
        received_NX = all_to_all_rows(payload_MX, send, recv, self.group, self.counter, "dispatch")
        # Received rows are grouped (source rank, expert); the experts want them grouped (expert, source rank).
        source_major = recv_QL.flatten()
        to_expert_major = torch.arange(self.ep_size * self.num_local).view(self.ep_size, self.num_local).t().flatten()
        grouped_NX, _ = sort_chunks_by_idxs(received_NX, source_major, to_expert_major)
        d = x_TD.shape[1]
        rows = ExpertRows(x_MD=grouped_NX[:, :d], counts=recv_QL.sum(dim=0).tolist(),
                          cache_ML=None if cache_ML is None else grouped_NX[:, d:])
        route = (recv_QL, send, recv)
        return rows, DispatchState(token_index_M, mask_SE, gates_SE, x_TD.shape[0], route=route)

    def combine(self, out_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        recv_QL, send, recv = state.route
        expert_major = recv_QL.t().flatten()
        to_source_major = torch.arange(self.ep_size * self.num_local).view(self.num_local, self.ep_size).t().flatten()
        back_MD, _ = sort_chunks_by_idxs(out_MD, expert_major, to_source_major)
        returned_MD = all_to_all_rows(back_MD, recv, send, self.group, self.counter, "combine")
        return weighted_sum(returned_MD, state.token_index_M, state.mask_TE, state.gates_TE, state.num_tokens)
