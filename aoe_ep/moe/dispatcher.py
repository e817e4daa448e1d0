"""The dispatcher interface the layer is typed against, the single-device dispatcher, and the byte counter.

A dispatcher decides which tokens are scored on this rank, how the scores of all n experts reach the decision, which
rows reach the experts this rank holds, how global sums are formed and how expert outputs get back to their tokens.
Phases as in Megatron-Core's token dispatchers: permute → (communicate) → compute → (communicate) → unpermute.

The layer never builds an expert-parallel dispatcher itself: `aoe_ep.parallel` registers its factories here
(`register_dispatcher`) when it is imported, which the `aoe_ep.moe` package does once this module is loaded; no module
of this package imports the parallel one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from aoe_ep.config import MoEConfig
from aoe_ep.moe.grouped import Groups
from aoe_ep.moe.routing import Decision, GroupedRows, group_rows, row_gates, weighted_sum
from aoe_ep.moe.scorers import Scores
from aoe_ep.moe.selection import expert_capacity, expert_choice_decision
from aoe_ep.moe.stats import BatchSums


@dataclass
class CommCounter:
    """Bytes sent by this rank, keyed by (collective name, "fwd" | "bwd")."""

    bytes: dict = field(default_factory=lambda: defaultdict(int))
    enabled: bool = True

    def add(self, name: str, direction: str, nbytes: int) -> None:
        if self.enabled:
            self.bytes[(name, direction)] += int(nbytes)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside (e.g. validation passes between two training logs)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def total(self, direction: Optional[str] = None) -> int:
        return sum(v for (_, d), v in self.bytes.items() if direction is None or d == direction)

    def as_dict(self) -> dict[str, int]:
        return {f"{name}/{direction}": v for (name, direction), v in sorted(self.bytes.items()) if v}

    def reset(self) -> None:
        self.bytes.clear()


@dataclass(frozen=True)
class TokenLayout:
    """How the EP group's tokens are laid out this step: rows per rank, this rank's index, and the number of
    non-finite input values over the group (an int where the dispatcher exchanged it, else a device tensor)."""

    sizes: tuple[int, ...]
    rank: int
    nonfinite: object = 0

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class ExpertRows:
    """What the experts compute on: x_MD grouped by local expert (`groups` counts them), and the low-rank cache row
    of each (token, expert) pair (None unless the scorer made one)."""

    x_MD: torch.Tensor
    groups: Groups
    cache_MR: Optional[torch.Tensor]


@dataclass(frozen=True)
class DispatchState:
    """What combine needs: the rows as grouped on this rank (token indices into the scored tokens), how many tokens
    the combined output has, and the dispatcher's own routing record (None for the local dispatcher)."""

    rows: GroupedRows
    num_tokens: int
    route: object = None


class Dispatcher(Protocol):
    """What `MoELayer` calls, in this order, once per forward."""

    ep_size: int
    ep_rank: int
    counter: CommCounter

    def layout(self, x_TD: torch.Tensor, nonfinite: torch.Tensor) -> TokenLayout: ...

    def scored_tokens(self, x_TD: torch.Tensor, layout: TokenLayout) -> torch.Tensor: ...

    def all_expert_scores(self, s_SX: torch.Tensor, layout: TokenLayout) -> torch.Tensor: ...

    def expert_choice(self, probs_SE: torch.Tensor, capacity_factor: float, layout: TokenLayout) -> Decision: ...

    def dispatch(
        self, x_TD: torch.Tensor, xs_SD: torch.Tensor, scores: Scores, decision: Decision, layout: TokenLayout
    ) -> tuple[ExpertRows, DispatchState, torch.Tensor]: ...

    def attach_scores(self, s_SX: torch.Tensor, s_SE: torch.Tensor, layout: TokenLayout) -> torch.Tensor: ...

    def own_rows(self, layout: TokenLayout) -> slice: ...

    def global_sums(
        self,
        mask_SE: torch.Tensor,
        probs_SE: torch.Tensor,
        entropy_S: torch.Tensor,
        s_SE: torch.Tensor,
        layout: TokenLayout,
        margin_S: Optional[torch.Tensor] = None,
        g_SE: Optional[torch.Tensor] = None,
    ) -> BatchSums: ...

    def combine(self, out_MD: torch.Tensor, gates_SE: torch.Tensor, state: DispatchState) -> torch.Tensor: ...

    def expert_columns(self, m_NX: torch.Tensor) -> torch.Tensor: ...


class LocalDispatcher:
    """Single device: the reference every expert-parallel dispatcher must reproduce. Moves nothing and, for top-K
    and expert choice, never synchronises with the host."""

    ep_size = 1
    ep_rank = 0

    def __init__(self) -> None:
        self.counter = CommCounter()

    def layout(self, x_TD: torch.Tensor, nonfinite: torch.Tensor) -> TokenLayout:
        return TokenLayout(sizes=(x_TD.shape[0],), rank=0, nonfinite=nonfinite)

    def scored_tokens(self, x_TD: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The tokens the scorer runs on (all of the EP group's under `allgather`)."""
        return x_TD

    def all_expert_scores(self, s_SX: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Decision scores over all n experts for the scored tokens, no gradient (AoE under `allgather` gathers the
        other ranks' columns)."""
        return s_SX.detach()

    def attach_scores(self, s_SX: torch.Tensor, s_SE: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The differentiable scores over all n experts, from this rank's differentiable columns `s_SX` and the
        decision scores `s_SE` (the same values)."""
        return s_SX

    def own_rows(self, layout: TokenLayout) -> slice:
        """Rows of the scored tokens that are this rank's own tokens."""
        return slice(None)

    def expert_choice(self, probs_SE: torch.Tensor, capacity_factor: float, layout: TokenLayout) -> Decision:
        """Expert choice over the scored tokens (the whole batch here and under `allgather`)."""
        n = probs_SE.shape[1]
        return expert_choice_decision(probs_SE, expert_capacity(probs_SE.shape[0], n, capacity_factor))

    def global_sums(
        self, mask_SE, probs_SE, entropy_S, s_SE, layout: TokenLayout, margin_S=None, g_SE=None
    ) -> BatchSums:
        """Detached sums over the EP group's batch (`g_SE`: threshold selection's gates, for its loss's sums)."""
        return BatchSums.of(mask_SE, probs_SE, entropy_S, s_SE, margin_S, g_SE)

    def dispatch(self, x_TD, xs_SD, scores: Scores, decision: Decision, layout: TokenLayout):
        rows = group_rows(decision)
        x_MD = x_TD.index_select(0, rows.token_index_M)
        s_SE, cache_MR = scores.attach(rows, x_MD)
        return ExpertRows(x_MD, rows.groups, cache_MR), DispatchState(rows, x_TD.shape[0]), s_SE

    def combine(self, out_MD: torch.Tensor, gates_SE: torch.Tensor, state: DispatchState) -> torch.Tensor:
        gate_M = row_gates(gates_SE, state.rows)
        return weighted_sum(out_MD, gate_M, state.rows.token_index_M, state.num_tokens)

    def expert_columns(self, m_NX: torch.Tensor) -> torch.Tensor:
        """[N, n] over all experts in global order, from this rank's columns [N, n_local] (a quantity every rank
        computes for its own experts only, such as the ERC norms); differentiable, the same on every rank."""
        return m_NX


DispatcherFactory = Callable[[dist.ProcessGroup, int], Dispatcher]
_FACTORIES: dict[str, DispatcherFactory] = {}


def register_dispatcher(name: str, factory: DispatcherFactory) -> None:
    """Make `moe.dispatcher: name` build `factory(ep_group, num_experts)` for an expert-parallel group."""
    _FACTORIES[name] = factory


def build_dispatcher(cfg: MoEConfig, ep_group: Optional[dist.ProcessGroup]) -> Dispatcher:
    """The local dispatcher without a group (or a group of one), else `cfg.dispatcher`'s over `ep_group`."""
    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return LocalDispatcher()
    ep_size = dist.get_world_size(ep_group)
    if cfg.num_experts % ep_size:
        raise ValueError(f"moe.num_experts={cfg.num_experts} is not divisible by the expert-parallel size {ep_size}")
    if cfg.dispatcher not in _FACTORIES:
        raise ValueError(
            f"moe.dispatcher={cfg.dispatcher!r} is not a registered expert-parallel dispatcher "
            f"(registered: {', '.join(sorted(_FACTORIES)) or 'none'})"
        )
    return _FACTORIES[cfg.dispatcher](ep_group, cfg.num_experts)
