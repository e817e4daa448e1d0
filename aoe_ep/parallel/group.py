"""Common ground of the expert-parallel dispatchers: an explicit EP group, n/EP local experts, and the token layout
every forward starts with (one all-gather of the row counts, which also carries the non-finite-input verdict)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from aoe_ep.moe.dispatcher import LocalDispatcher, TokenLayout
from aoe_ep.parallel.collectives import all_gather_sizes


class GroupDispatcher(LocalDispatcher):
    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        super().__init__()
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.local_experts = slice(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)

    def layout(self, x_TD: torch.Tensor, nonfinite: torch.Tensor) -> TokenLayout:
        sizes, bad = all_gather_sizes(x_TD.shape[0], nonfinite, self.group, self.counter)
        return TokenLayout(tuple(sizes), self.ep_rank, nonfinite=sum(bad))
