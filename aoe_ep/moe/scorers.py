"""Scorers: what ranks the experts for each token (DESIGN.md section 1).

Each scorer maps x_TD to a score matrix s_TE over the experts it holds and, for AoE, the low-rank cache that the
selected experts reuse. All three share one interface so that selection, losses and dispatch never ask which
scorer they are talking to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aoe_ep.config import MoEConfig


@dataclass(frozen=True)
class Scores:
    """s_TE: one score per (token, expert); cache_TEL: AoE's x·Wdown per expert (None for the other scorers)."""

    s_TE: torch.Tensor
    cache_TEL: Optional[torch.Tensor] = None


class RouterScorer(nn.Module):
    """Learned router, Eq. 2: logits = x Wr (stored as `weight [n, d]`, applied as x @ weight.T).

    With `router_hidden` = h it is the paper's "large router" (Table 2 config 4): SiLU(x @ w_hidden) @ weight.T,
    w_hidden [d, h], weight [n, h]; h = n·d_low puts as many parameters into selection as AoE's Wdown.
    """

    def __init__(self, cfg: MoEConfig, num_experts: int):
        super().__init__()
        width = cfg.router_hidden or cfg.d_model
        self.w_hidden = None
        if cfg.router_hidden:
            self.w_hidden = nn.Parameter(torch.empty(cfg.d_model, cfg.router_hidden))
            nn.init.normal_(self.w_hidden, std=cfg.d_model ** -0.5)
        self.weight = nn.Parameter(torch.empty(num_experts, width))
        nn.init.normal_(self.weight, std=width ** -0.5)

    def forward(self, x_TD: torch.Tensor) -> Scores:
        h_TH = x_TD if self.w_hidden is None else F.silu(x_TD @ self.w_hidden)
        return Scores(s_TE=h_TH @ self.weight.t())


class AoEScorer(nn.Module):
    """AoE self-evaluation, Eq. 6: every expert computes its cache C_i = x Wdown_i, scored by ||C_i|| (App. A norms).

    All experts' Wdown are stacked [E, d, d_low] and applied as one [d, E·d_low] matmul.
    """

    ORDERS = {"l2": 2.0, "l1": 1.0, "linf": float("inf")}

    def __init__(self, cfg: MoEConfig, num_experts: int):
        super().__init__()
        self.ord = self.ORDERS[cfg.norm]
        self.w_down = nn.Parameter(torch.empty(num_experts, cfg.d_model, cfg.d_low))
        nn.init.normal_(self.w_down, std=cfg.d_model ** -0.5)

    def cache(self, x_TD: torch.Tensor) -> torch.Tensor:
        num_experts, d_model, d_low = self.w_down.shape
        w_down_DX = self.w_down.permute(1, 0, 2).reshape(d_model, num_experts * d_low)
        return (x_TD @ w_down_DX).view(x_TD.shape[0], num_experts, d_low)

    def forward(self, x_TD: torch.Tensor) -> Scores:
        cache_TEL = self.cache(x_TD)
        s_TE = torch.linalg.vector_norm(cache_TEL, ord=self.ord, dim=-1)
        return Scores(s_TE=s_TE, cache_TEL=cache_TEL)


class SelfRoutingScorer(nn.Module):
    """Self-Routing: the expert logits are a slice of the hidden state itself; no parameters."""

    def __init__(self, cfg: MoEConfig, num_experts: int):
        super().__init__()
        self.offset = cfg.self_routing_offset
        self.num_experts = num_experts

    def forward(self, x_TD: torch.Tensor) -> Scores:
        return Scores(s_TE=x_TD[:, self.offset:self.offset + self.num_experts])


SCORERS = {"router": RouterScorer, "aoe": AoEScorer, "self_routing": SelfRoutingScorer}


def build_scorer(cfg: MoEConfig, num_experts: Optional[int] = None) -> nn.Module:
    """The scorer of `cfg`; `num_experts` lets an expert-parallel rank hold only its own AoE selectors."""
    return SCORERS[cfg.scorer](cfg, cfg.num_experts if num_experts is None else num_experts)
