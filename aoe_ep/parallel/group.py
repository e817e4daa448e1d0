"""Common ground of the expert-parallel dispatchers: an explicit EP group, n/EP local experts, the layer's expert
placement, and the token layout every forward starts with (one all-gather of the row counts, which also carries the
non-finite-input verdict).

Under a placement other than the contiguous one, the decision is still taken over the global experts (ties towards
the lower global index); the dispatchers read its columns in placed order (`placed`: rank 0's experts, then rank
1's, ...), so that each rank's experts are again one block of n/EP columns.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from aoe_ep.moe.dispatcher import LocalDispatcher, TokenLayout
from aoe_ep.moe.placement import Placement
from aoe_ep.parallel.collectives import all_gather_shared, all_gather_sizes


class GroupDispatcher(LocalDispatcher):
    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        super().__init__()
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.local_experts = slice(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)
        self.set_placement(Placement.contiguous(num_experts, self.ep_size))

    def set_placement(self, placement: Placement) -> None:
        """Route to the ranks `placement` names (the caller moves the expert parameters with it)."""
        if placement.num_experts != self.num_experts or placement.num_devices != self.ep_size:
            raise ValueError(
                f"a placement of {placement.num_experts} experts over {placement.num_devices} ranks "
                f"does not fit {self.num_experts} experts over EP {self.ep_size}"
            )
        self.placement = placement
        self._order: Optional[list[int]] = None if placement.is_contiguous else placement.order
        self._cached: dict = {}

    def _index(self, kind: str, device: torch.device) -> torch.Tensor:
        key = (kind, device)
        if key not in self._cached:
            values = self.placement.order if kind == "order" else self.placement.position
            self._cached[key] = torch.tensor(values, dtype=torch.int64, device=device)
        return self._cached[key]

    def placed(self, x_SE: torch.Tensor) -> torch.Tensor:
        """Columns of a [S, n] tensor over global experts, in placed order (differentiable; the tensor itself under
        the contiguous placement)."""
        return x_SE if self._order is None else x_SE.index_select(1, self._index("order", x_SE.device))

    def unplaced(self, x_SP: torch.Tensor) -> torch.Tensor:
        """The inverse of `placed`: columns in placed order back to global expert order."""
        return x_SP if self._order is None else x_SP.index_select(1, self._index("position", x_SP.device))

    def layout(self, x_TD: torch.Tensor, nonfinite: torch.Tensor) -> TokenLayout:
        sizes, bad = all_gather_sizes(x_TD.shape[0], nonfinite, self.group, self.counter)
        return TokenLayout(tuple(sizes), self.ep_rank, nonfinite=sum(bad))

    def expert_columns(self, m_NX: torch.Tensor) -> torch.Tensor:
        """One all-gather of every rank's expert columns (counted as "erc"); every rank then computes the same
        function of the result, so backward hands each rank the gradient of its own columns (`all_gather_shared`)."""
        m_PN = all_gather_shared(
            m_NX.t().contiguous(), [self.num_local] * self.ep_size, self.group, self.counter, "erc"
        )
        return self.unplaced(m_PN.t())
