"""The MoE layer: score → decide → dispatch → experts → combine, plus its aux loss and load statistics.

Read `aoe_ep/moe/reference.py` first: the same layer written per token, which this one must equal in outputs, losses,
statistics and every gradient (tests/moe/test_layer_reference.py holds it there).

The layer never asks about ranks: the dispatcher (`aoe_ep.moe.dispatcher.Dispatcher`), built from `ep_group` and
`cfg.dispatcher` or handed in, decides which tokens are scored here, which rows reach the experts this layer holds,
and how global sums are formed. On one device, top-K and expert choice run without a host synchronisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from aoe_ep.config import MoEConfig
from aoe_ep.moe.balancing import THRESHOLD_BIAS_INIT, build_balancing, build_coupling
from aoe_ep.moe.context import DEFAULT_CONTEXT, StepContext
from aoe_ep.moe.dispatcher import Dispatcher, TokenLayout, build_dispatcher
from aoe_ep.moe.experts import build_experts, compute_dtype
from aoe_ep.moe.losses import scale_gradient, token_entropy
from aoe_ep.moe.placement import Placement
from aoe_ep.moe.scorers import build_scorer, scorer_sharded_over_ep
from aoe_ep.moe.selection import weigh
from aoe_ep.moe.stats import BatchSums, LoadStats, selection_margin

__all__ = ["THRESHOLD_BIAS_INIT", "LayerTiming", "MoEInfo", "MoELayer", "StepContext"]


@dataclass(frozen=True)
class LayerTiming:
    """Wall-clock seconds of this rank's forward: in its experts, and in the combine (where it waits for others)."""

    expert_seconds: float
    combine_seconds: float


@dataclass(frozen=True)
class MoEInfo:
    """aux_loss: this layer's auxiliary loss over the EP group's batch, the same value on every rank: add it to the
    training loss (its gradient flows through this rank's tokens only; summed over the EP group it is the
    single-device gradient, or, under the step context's `rank_mean_gradients`, averaged over the data-parallel
    world); stats: its `LoadStats` (global); timing: this rank's `LayerTiming`; nonfinite_inputs: NaN or infinite
    input values over the EP group (an int, or a 0-dim device tensor on one device; nonzero only under the context's
    `input_check = "flag"`, which lets them through); mask_TE: which experts this rank's tokens selected [T, n]
    (bool; only under the context's `record_selection`, else None); erc_loss, erc_eps: the ERC loss (before its
    weight, included in aux_loss) and the mean ε over experts, detached 0-dim tensors (None unless
    `moe.erc_loss_coeff` is set and the layer is training)."""

    aux_loss: torch.Tensor
    stats: LoadStats
    timing: LayerTiming
    nonfinite_inputs: object = 0
    mask_TE: Optional[torch.Tensor] = None
    erc_loss: Optional[torch.Tensor] = None
    erc_eps: Optional[torch.Tensor] = None


def count_nonfinite(x: torch.Tensor, d_model: int) -> torch.Tensor:
    """Non-finite values in x (a 0-dim int64 tensor on x's device: no host synchronisation); checks the shape."""
    if x.shape[-1] != d_model:
        raise ValueError(f"MoELayer expects inputs [..., {d_model}], got shape {tuple(x.shape)}")
    return (~torch.isfinite(x)).sum()


def nonfinite_error(count: int, where: str = "") -> ValueError:
    return ValueError(f"MoELayer input holds {count} NaN or infinite value(s){where}; refusing to route them")


def mark_expert_parameters(params) -> None:
    """Tag parameters sharded over the expert-parallel group: their gradients are reduced over the expert-data-parallel
    group (sum, divided by the world size), every other parameter's over the whole data-parallel world."""
    for p in params:
        p.expert_parallel = True


def _wait(x: torch.Tensor, synchronize: bool) -> float:
    """The time now, after the accelerator has finished its queued work when `synchronize` is set."""
    if synchronize and x.device.type != "cpu":
        torch.accelerator.synchronize(x.device)
    return time.perf_counter()


class MoELayer(nn.Module):
    """AoE, routed-MoE or Self-Routing FFN layer (docs/design.md sections 1, 2 and 5).

    `y, info = layer(x)` maps x [..., d_model] to y of the same shape: y = Σ_{i∈I} g_i · E_i(x). With `ep_group`,
    this rank holds experts [r·n/EP, (r+1)·n/EP) (or those its `placement` names) and x is this rank's tokens;
    info is the same on every rank. `layer(x, ctx=...)` runs under a `StepContext` (what the trainer tells the
    layers each step: `aoe_ep.moe.context`); `index` is the layer's position among a model's MoE layers (it keys
    the ERC noise).

    `info.timing` is host wall-clock; on an accelerator it measures device work only under the context's
    `synchronize_timing`. Balancing (`aoe_ep.moe.balancing`) is one scheme object, `balancing`, chosen from the
    config, plus `coupling`, the ERC loss when `moe.erc_loss_coeff` is set.
    """

    def __init__(
        self,
        cfg: MoEConfig,
        ep_group: Optional[dist.ProcessGroup] = None,
        dispatcher: Optional[Dispatcher] = None,
        index: int = 0,
    ):
        super().__init__()
        cfg.validate("moe")
        self.cfg = cfg
        self.index = index
        self.dispatcher = dispatcher if dispatcher is not None else build_dispatcher(cfg, ep_group)
        ep_size, ep_rank = self.dispatcher.ep_size, self.dispatcher.ep_rank
        self.num_local_experts = cfg.num_experts // ep_size
        self.expert_offset = ep_rank * self.num_local_experts  # under the contiguous placement
        # Under `allgather` each rank scores only its own experts' Wdown; under `alltoall` the selector is replicated.
        self.scorer_is_sharded = scorer_sharded_over_ep(cfg, ep_size)
        self.scorer = build_scorer(cfg, self.num_local_experts if self.scorer_is_sharded else cfg.num_experts)
        self.experts = build_experts(cfg, self.num_local_experts)
        mark_expert_parameters(self.experts.parameters())
        if self.scorer_is_sharded:
            mark_expert_parameters(self.scorer.parameters())
        self.balancing = build_balancing(cfg)
        self.balancing.register(self)
        self.coupling = build_coupling(cfg)

    def _check(self, nonfinite, layout_count, input_check: str) -> None:
        """`input_check = "raise"`: a ValueError for non-finite input. Where the dispatcher exchanged the count
        (expert parallel), every rank of the group raises together; on one CPU device the check is eager; on an
        accelerator it is an asynchronous device assertion, so that it never blocks the host."""
        if input_check != "raise":
            return
        if isinstance(layout_count, int):
            if layout_count:
                raise nonfinite_error(layout_count, " on the expert-parallel group")
        elif nonfinite.device.type == "cpu":
            if int(nonfinite):
                raise nonfinite_error(int(nonfinite))
        else:
            torch._assert_async(nonfinite == 0, "MoELayer input holds NaN or infinite values")

    def gate(
        self, s_SE: torch.Tensor, s_dec_SE: torch.Tensor, mask_SE: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, BatchSums, torch.Tensor]:
        """(gates_SE, the batch sums, the balancing loss) from the differentiable scores s_SE, the decision's scores
        and its mask. One method, so that `train.compile` can compile it as one graph on a single device
        (aoe_ep/train/compile.py); under expert parallelism the sums are collectives and it stays eager."""
        d, scheme = self.dispatcher, self.balancing
        g_SE = scheme.gates(self, s_SE)
        probs_SE, gates_SE = weigh(s_SE, mask_SE, self.cfg.gate, g_SE)
        entropy_S = token_entropy(s_SE, probs_SE)
        # Expert choice decides per expert, so a token's score margin says nothing about it: none is recorded.
        margin_S = (
            None
            if self.cfg.selection == "expert_choice"
            else selection_margin(scheme.ranked(self, s_dec_SE, g_SE), mask_SE)
        )
        sums = d.global_sums(mask_SE, probs_SE, entropy_S, s_SE, layout, margin_S, g_SE)
        loss = scheme.loss(self, d.own_rows(layout), mask_SE, probs_SE, entropy_S, g_SE, sums)
        return gates_SE, sums, loss

    def forward(self, x: torch.Tensor, ctx: StepContext = DEFAULT_CONTEXT) -> tuple[torch.Tensor, MoEInfo]:
        cfg, d, scheme = self.cfg, self.dispatcher, self.balancing
        nonfinite = count_nonfinite(x, cfg.d_model)
        # Rows travel and experts run in the compute dtype (autocast's, if on); scores and gates in at least fp32.
        x_TD = x.reshape(-1, cfg.d_model).to(compute_dtype(x))
        layout = d.layout(x_TD, nonfinite)
        self._check(nonfinite, layout.nonfinite, ctx.input_check)

        # score: the scorer runs on the tokens the dispatcher scores here; the decision sees all n experts' scores
        xs_SD = d.scored_tokens(x_TD, layout)
        scores = self.scorer(xs_SD)
        s_dec_SE = d.all_expert_scores(scores.s_TE, layout)
        # decide (the balancing scheme may shift the ranked scores, or select by its own gates)
        decision = scheme.decide(
            self, s_dec_SE, partial(d.expert_choice, capacity_factor=cfg.capacity_factor, layout=layout)
        )
        # dispatch: the selected rows reach their experts' ranks; the differentiable scores come back attached
        rows, state, s_SX = d.dispatch(x_TD, xs_SD, scores, decision, layout)
        s_SE = d.attach_scores(s_SX, s_dec_SE, layout)
        gates_SE, sums, loss = self.gate(s_SE, s_dec_SE, decision.mask_SE, layout)

        # experts (with the ERC gate norms in the same call: FSDP2 gathers their weights once per forward)
        coupling = self.coupling if self.training else None
        proxies_nd, eps_n = coupling.proxies(self, ctx) if coupling is not None else (None, None)
        sync = ctx.synchronize_timing
        start = _wait(x, sync)
        if proxies_nd is None:
            out_MD, m_nX = self.experts(rows.x_MD, rows.groups, rows.cache_MR), None
        else:
            out_MD, m_nX = self.experts(rows.x_MD, rows.groups, rows.cache_MR, gate_norms_of=proxies_nd)
        after_experts = _wait(x, sync)
        # combine: each token's expert outputs, weighted by its gates, back on its rank
        y_TD = d.combine(out_MD, gates_SE, state)
        expert_seconds, combine_seconds = after_experts - start, _wait(x, sync) - after_experts
        erc = None if m_nX is None else coupling.loss(d.expert_columns, m_nX)
        if erc is not None:
            loss = loss + coupling.coeff * erc
        if ctx.rank_mean_gradients and d.ep_size > 1:
            loss = scale_gradient(loss, d.ep_size)

        info = MoEInfo(
            aux_loss=loss,
            stats=sums.stats(),
            timing=LayerTiming(expert_seconds, combine_seconds),
            nonfinite_inputs=layout.nonfinite,
            mask_TE=decision.mask_SE[d.own_rows(layout)] if ctx.record_selection else None,
            erc_loss=None if erc is None else erc.detach(),
            erc_eps=None if erc is None else eps_n.mean(),
        )
        return y_TD.to(x_TD.dtype).view(x.shape[:-1] + (cfg.d_model,)), info

    @property
    def placement(self) -> Placement:
        """Which global experts each rank of the EP group holds (`aoe_ep.moe.placement`)."""
        placement = getattr(self.dispatcher, "placement", None)
        return placement if placement is not None else Placement.contiguous(self.cfg.num_experts, 1)

    @property
    def held_experts(self) -> tuple[int, ...]:
        """The global experts of this rank's local stack, in its order."""
        return self.placement.experts[self.dispatcher.ep_rank]

    def set_placement(self, placement: Placement) -> None:
        """Route by `placement` from now on. The expert parameters (and their optimizer state) must be moved with
        it: `aoe_ep.parallel.reshard.move_experts` does that for a tensor."""
        if self.dispatcher.ep_size == 1:
            if placement.num_devices != 1:
                raise ValueError(f"a placement over {placement.num_devices} ranks on a single-device layer")
            return
        self.dispatcher.set_placement(placement)

    def load_full_state_dict(self, state: dict) -> None:
        """Load the single-device layer's parameters (all n experts), keeping the experts this rank holds."""
        local = {}
        own = list(self.held_experts)
        for name, tensor in state.items():
            sharded = name.startswith("experts.") or (self.scorer_is_sharded and name.startswith("scorer."))
            local[name] = tensor[own] if sharded else tensor
        self.load_state_dict(local)
