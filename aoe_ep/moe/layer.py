"""The MoE layer: score → select → dispatch → experts → combine, plus its aux loss and load statistics.

The layer never asks about ranks: the dispatcher decides which rows reach the experts it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aoe_ep.config import MoEConfig
from aoe_ep.moe.experts import build_experts
from aoe_ep.moe.losses import aux_loss, token_entropy
from aoe_ep.moe.scorers import build_scorer
from aoe_ep.moe.selection import select
from aoe_ep.moe.stats import LoadStats
from aoe_ep.parallel.local import LocalDispatcher


@dataclass(frozen=True)
class MoEInfo:
    """aux_loss: this layer's auxiliary loss (add it to the training loss); stats: its `LoadStats`."""

    aux_loss: torch.Tensor
    stats: LoadStats


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


class MoELayer(nn.Module):
    """AoE, routed-MoE or Self-Routing FFN layer (DESIGN.md sections 1 and 5).

    `y, info = layer(x)` maps x [..., d_model] to y of the same shape: y = Σ_{i∈I} g_i · E_i(x).
    """

    def __init__(self, cfg: MoEConfig, ep_group=None):
        super().__init__()
        cfg.validate("moe")
        if ep_group is not None and ep_group.size() > 1:
            raise NotImplementedError("expert parallelism (ep_group of size > 1) is not available in this build yet")
        self.cfg = cfg
        self.scorer = build_scorer(cfg)
        self.experts = build_experts(cfg)
        self.dispatcher = LocalDispatcher()
        mark_expert_parameters(self.experts.parameters())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEInfo]:
        cfg = self.cfg
        check_input(x, cfg.d_model)
        x_TD = x.reshape(-1, cfg.d_model)
        num_tokens = x_TD.shape[0]

        scores = self.scorer(x_TD)
        sel = select(scores.s_TE, cfg)
        entropy_T = token_entropy(scores.s_TE, sel.probs_TE)
        tokens_per_expert_E = sel.mask_TE.sum(dim=0)

        rows, state = self.dispatcher.dispatch(x_TD, scores.cache_TEL, sel.mask_TE, sel.gates_TE)
        out_MD = self.experts(rows.x_MD, rows.counts, rows.cache_ML)
        y_TD = self.dispatcher.combine(out_MD, state)

        loss = aux_loss(cfg, sel.probs_TE, entropy_T, tokens_per_expert_E, num_tokens)
        stats = LoadStats.from_counts(tokens_per_expert_E, entropy_T.detach().sum(), scores.s_TE.detach().sum(dim=0),
                                      num_tokens)
        return y_TD.view(x.shape), MoEInfo(aux_loss=loss, stats=stats)
