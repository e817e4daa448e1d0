"""The MoE layer: score → select → dispatch → experts → combine, plus its aux loss and load statistics.

The layer never asks about ranks: the dispatcher, chosen from `ep_group` and `cfg.dispatcher`, decides which tokens
are scored here, which rows reach the experts this layer holds, and how global sums are formed.
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
from aoe_ep.moe.experts import build_experts
from aoe_ep.moe.losses import aux_loss, token_entropy
from aoe_ep.moe.scorers import build_scorer
from aoe_ep.moe.selection import select
from aoe_ep.moe.stats import LoadStats


@dataclass(frozen=True)
class LayerTiming:
    """Wall-clock seconds of this rank's forward: in its experts, and in the combine (where it waits for others)."""

    expert_seconds: float
    combine_seconds: float


@dataclass(frozen=True)
class MoEInfo:
    """aux_loss: this layer's auxiliary loss over the EP group's batch (add it to the training loss; the same value
    on every rank); stats: its `LoadStats` (global); timing: this rank's `LayerTiming`."""

    aux_loss: torch.Tensor
    stats: LoadStats
    timing: LayerTiming


def check_input(x: torch.Tensor, d_model: int) -> None:
    if x.shape[-1] != d_model:
        raise ValueError(f"MoELayer expects inputs [..., {d_model}], got shape {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"MoELayer input holds {bad} NaN or infinite value(s); refusing to route them")


def mark_expert_parameters(params) -> None:
    """Tag parameters sharded over the expert-parallel group: their gradients are reduced over the expert-data-parallel
    group (sum, divided by the world size), every other parameter's over the whole data-parallel world."""
    for p in params:
        p.expert_parallel = True


def build_dispatcher(cfg: MoEConfig, ep_group: Optional[dist.ProcessGroup]):
    from aoe_ep.parallel import AllGatherDispatcher, AllToAllDispatcher, LocalDispatcher

    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return LocalDispatcher()
    if cfg.num_experts % dist.get_world_size(ep_group):
        raise ValueError(f"moe.num_experts={cfg.num_experts} is not divisible by the expert-parallel size "
                         f"{dist.get_world_size(ep_group)}")
    cls = AllGatherDispatcher if cfg.dispatcher == "allgather" else AllToAllDispatcher
    return cls(ep_group, cfg.num_experts)


def _wait(x: torch.Tensor, synchronize: bool) -> float:
    """The time now, after the accelerator has finished its queued work when `synchronize` is set."""
    if synchronize and x.device.type != "cpu":
        torch.accelerator.synchronize(x.device)
    return time.perf_counter()


class MoELayer(nn.Module):
    """AoE, routed-MoE or Self-Routing FFN layer (DESIGN.md sections 1, 2 and 5).

    `y, info = layer(x)` maps x [..., d_model] to y of the same shape: y = Σ_{i∈I} g_i · E_i(x). With `ep_group`,
    this rank holds experts [r·n/EP, (r+1)·n/EP) and x is this rank's tokens; info is the same on every rank.

    `info.timing` is host wall-clock; on an accelerator it measures device work only while `synchronize_timing` is
    set (the trainer sets it on logging steps, as synchronising every layer costs throughput).
    """

    synchronize_timing = False

    def __init__(self, cfg: MoEConfig, ep_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        cfg.validate("moe")
        self.cfg = cfg
        self.dispatcher = build_dispatcher(cfg, ep_group)
        ep_size, ep_rank = self.dispatcher.ep_size, self.dispatcher.ep_rank
        self.num_local_experts = cfg.num_experts // ep_size
        self.expert_offset = ep_rank * self.num_local_experts
        # Under `allgather` each rank scores only its own experts' Wdown; under `alltoall` the selector is replicated.
        self.scorer_is_sharded = cfg.scorer == "aoe" and cfg.dispatcher == "allgather" and ep_size > 1
        self.scorer = build_scorer(cfg, self.num_local_experts if self.scorer_is_sharded else cfg.num_experts)
        self.experts = build_experts(cfg, self.num_local_experts)
        mark_expert_parameters(self.experts.parameters())
        if self.scorer_is_sharded:
            mark_expert_parameters(self.scorer.parameters())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEInfo]:
        cfg, d = self.cfg, self.dispatcher
        check_input(x, cfg.d_model)
        x_TD = x.reshape(-1, cfg.d_model)

        layout = d.layout(x_TD)
        xs_SD = d.scored_tokens(x_TD, layout)
        scores = self.scorer(xs_SD)
        s_SE = d.all_expert_scores(scores.s_TE, layout)
        sel = select(s_SE, cfg, expert_choice=partial(d.expert_choice, capacity_factor=cfg.capacity_factor,
                                                      layout=layout))
        entropy_S = token_entropy(s_SE, sel.probs_TE)
        sums = d.global_sums(sel.mask_TE, sel.probs_TE, entropy_S, s_SE, layout)
        own = d.own_rows(layout)
        loss = aux_loss(cfg, sel.probs_TE[own], entropy_S[own], sums)

        rows, state = d.dispatch(x_TD, xs_SD, scores.cache_TEL, sel.mask_TE, sel.gates_TE, layout)
        sync = self.synchronize_timing
        start = _wait(x, sync)
        out_MD = self.experts(rows.x_MD, rows.counts, rows.cache_ML)
        after_experts = _wait(x, sync)
        y_TD = d.combine(out_MD, state)
        expert_seconds, combine_seconds = after_experts - start, _wait(x, sync) - after_experts

        info = MoEInfo(aux_loss=loss, stats=sums.stats(), timing=LayerTiming(expert_seconds, combine_seconds))
        return y_TD.view(x.shape), info

    def load_full_state_dict(self, state: dict) -> None:
        """Load the single-device layer's parameters (all n experts), keeping the slice this rank holds."""
        local = {}
        own = slice(self.expert_offset, self.expert_offset + self.num_local_experts)
        for name, tensor in state.items():
            sharded = name.startswith("experts.") or (self.scorer_is_sharded and name.startswith("scorer."))
            local[name] = tensor[own] if sharded else tensor
        self.load_state_dict(local)
