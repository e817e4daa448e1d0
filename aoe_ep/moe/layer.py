"""The MoE layer: score → decide → dispatch → experts → combine, plus its aux loss and load statistics.

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
from aoe_ep.moe.dispatcher import Dispatcher, build_dispatcher
from aoe_ep.moe.experts import build_experts, compute_dtype
from aoe_ep.moe.losses import (aux_loss, erc_eps, erc_from_norms, erc_noise, erc_proxies, threshold_balance_loss,
                               token_entropy)
from aoe_ep.moe.placement import Placement
from aoe_ep.moe.scorers import build_scorer, scorer_sharded_over_ep
from aoe_ep.moe.selection import decide, threshold_gates, weigh
from aoe_ep.moe.stats import LoadStats, selection_margin

INPUT_CHECKS = ("raise", "flag")
THRESHOLD_BIAS_INIT = 1e-6  # Routing-Free MoE's initial b


@dataclass(frozen=True)
class LayerTiming:
    """Wall-clock seconds of this rank's forward: in its experts, and in the combine (where it waits for others)."""

    expert_seconds: float
    combine_seconds: float


@dataclass(frozen=True)
class MoEInfo:
    """aux_loss: this layer's auxiliary loss over the EP group's batch (add it to the training loss; the same value
    on every rank); stats: its `LoadStats` (global); timing: this rank's `LayerTiming`; nonfinite_inputs: NaN or
    infinite input values over the EP group (an int, or a 0-dim device tensor on one device; nonzero only under
    `input_check = "flag"`, which lets them through); mask_TE: which experts this rank's tokens selected [T, n]
    (bool; only while the layer's `record_selection` is set, else None); erc_loss, erc_eps: the ERC loss (before its
    weight, included in aux_loss) and the mean ε over experts, detached 0-dim tensors (None unless `moe.erc_loss_coeff`
    is set and the layer is training)."""

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
    """AoE, routed-MoE or Self-Routing FFN layer (DESIGN.md sections 1, 2 and 5).

    `y, info = layer(x)` maps x [..., d_model] to y of the same shape: y = Σ_{i∈I} g_i · E_i(x). With `ep_group`,
    this rank holds experts [r·n/EP, (r+1)·n/EP) (or those its `placement` names) and x is this rank's tokens;
    info is the same on every rank.

    `info.timing` is host wall-clock; on an accelerator it measures device work only while `synchronize_timing` is
    set (the trainer sets it on logging steps, as synchronising every layer costs throughput). `record_selection`
    puts the selection mask of this rank's tokens into `info.mask_TE` (the churn probe sets it). The ERC loss draws
    its noise from (`erc_seed`, `erc_layer`, `erc_step`): the trainer sets the run seed and the layer's index once and
    the step before every training step, so the noise is the same on every rank and after a resume.
    """

    synchronize_timing = False
    record_selection = False
    input_check = "raise"
    erc_seed = 0
    erc_layer = 0
    erc_step = 0

    def __init__(self, cfg: MoEConfig, ep_group: Optional[dist.ProcessGroup] = None,
                 dispatcher: Optional[Dispatcher] = None):
        super().__init__()
        cfg.validate("moe")
        self.cfg = cfg
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
        if cfg.balance == "bias":
            # Replicated on every rank; moved after each optimiser step from the step's global counts
            # (aoe_ep.moe.balance); no gradient.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        if cfg.selection == "threshold":
            # Routing-Free MoE's b (replicated like the router, its gradient from this rank's uses), and the weight
            # λ of its balancing loss, moved after each optimiser step from the step's density (aoe_ep/moe/threshold.py).
            self.threshold_bias = nn.Parameter(torch.full((cfg.num_experts,), THRESHOLD_BIAS_INIT))
            self.register_buffer("threshold_lambda", torch.tensor(float(cfg.threshold_lambda_init)))

    def _check(self, nonfinite, layout_count) -> None:
        """`input_check = "raise"`: a ValueError for non-finite input. Where the dispatcher exchanged the count
        (expert parallel), every rank of the group raises together; on one CPU device the check is eager; on an
        accelerator it is an asynchronous device assertion, so that it never blocks the host."""
        if self.input_check != "raise":
            return
        if isinstance(layout_count, int):
            if layout_count:
                raise nonfinite_error(layout_count, " on the expert-parallel group")
        elif nonfinite.device.type == "cpu":
            if int(nonfinite):
                raise nonfinite_error(int(nonfinite))
        else:
            torch._assert_async(nonfinite == 0, "MoELayer input holds NaN or infinite values")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEInfo]:
        cfg, d = self.cfg, self.dispatcher
        if self.input_check not in INPUT_CHECKS:
            raise ValueError(f"MoELayer.input_check must be one of {INPUT_CHECKS}, got {self.input_check!r}")
        nonfinite = count_nonfinite(x, cfg.d_model)
        # Rows travel and experts run in the compute dtype (autocast's, if on); scores and gates in at least fp32.
        x_TD = x.reshape(-1, cfg.d_model).to(compute_dtype(x))

        layout = d.layout(x_TD, nonfinite)
        self._check(nonfinite, layout.nonfinite)
        xs_SD = d.scored_tokens(x_TD, layout)
        scores = self.scorer(xs_SD)
        s_dec_SE = d.all_expert_scores(scores.s_TE, layout)
        bias_E = getattr(self, "expert_bias", None)
        threshold_bias_E = getattr(self, "threshold_bias", None)
        decision = decide(s_dec_SE, cfg, expert_choice=partial(d.expert_choice, capacity_factor=cfg.capacity_factor,
                                                               layout=layout),
                          bias_E=bias_E, threshold_bias_E=threshold_bias_E)
        rows, state, s_SX = d.dispatch(x_TD, xs_SD, scores, decision, layout)
        s_SE = d.attach_scores(s_SX, s_dec_SE, layout)
        g_SE = None if threshold_bias_E is None else threshold_gates(s_SE, threshold_bias_E)
        probs_SE, gates_SE = weigh(s_SE, decision.mask_SE, cfg.gate, g_SE)
        entropy_S = token_entropy(s_SE, probs_SE)
        # Expert choice decides per expert, so a token's score margin says nothing about it: none is recorded. The
        # margin is that of the scores the decision ranked (biased under `moe.balance: bias`; G under threshold
        # selection), so it is never negative.
        ranked_SE = g_SE if g_SE is not None else s_dec_SE if bias_E is None else s_dec_SE.detach() + bias_E
        margin_S = None if cfg.selection == "expert_choice" else selection_margin(ranked_SE, decision.mask_SE)
        sums = d.global_sums(decision.mask_SE, probs_SE, entropy_S, s_SE, layout, margin_S, g_SE)
        own = d.own_rows(layout)
        if g_SE is None:
            loss = aux_loss(cfg, probs_SE[own], entropy_S[own], sums)
        else:
            loss = self.threshold_lambda.to(g_SE.dtype) * threshold_balance_loss(cfg, g_SE[own],
                                                                                 decision.mask_SE[own], sums)
        proxies_nd, eps_n = self._erc_proxies() if cfg.erc_loss_coeff > 0 and self.training else (None, None)

        sync = self.synchronize_timing
        start = _wait(x, sync)
        if proxies_nd is None:
            out_MD, m_nX = self.experts(rows.x_MD, rows.groups, rows.cache_ML), None
        else:  # one call of the experts for both (FSDP2 gathers their weights once per forward)
            out_MD, m_nX = self.experts(rows.x_MD, rows.groups, rows.cache_ML, gate_norms_of=proxies_nd)
        after_experts = _wait(x, sync)
        y_TD = d.combine(out_MD, gates_SE, state)
        expert_seconds, combine_seconds = after_experts - start, _wait(x, sync) - after_experts
        erc = None if m_nX is None else erc_from_norms(d.expert_columns(m_nX), cfg.erc_alpha)
        if erc is not None:
            loss = loss + cfg.erc_loss_coeff * erc

        info = MoEInfo(aux_loss=loss, stats=sums.stats(), timing=LayerTiming(expert_seconds, combine_seconds),
                       nonfinite_inputs=layout.nonfinite,
                       mask_TE=decision.mask_SE[own] if self.record_selection else None,
                       erc_loss=None if erc is None else erc.detach(),
                       erc_eps=None if erc is None else eps_n.mean())
        return y_TD.to(x_TD.dtype).view(x.shape[:-1] + (cfg.d_model,)), info

    def _erc_proxies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ERC proxies R̃ [n, d] of the router rows (differentiable in R) and ε [n] (`aoe_ep.moe.losses`); the
        experts return their columns of M = ‖R̃ W_g‖ with their outputs, and the dispatcher gathers them."""
        router_nd = self.scorer.weight
        u_nd = erc_noise(*router_nd.shape, self.erc_seed, self.erc_layer, self.erc_step).to(router_nd.device)
        eps_n = erc_eps(router_nd)
        return erc_proxies(router_nd, eps_n, u_nd), eps_n

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
