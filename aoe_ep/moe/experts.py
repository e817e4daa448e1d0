"""Experts, stacked [E, ...] and run on rows already grouped per expert (one matmul per expert, no token loop).

`SwiGLUExperts` is the Llama expert of the routed MoE and Self-Routing; `AoEExperts` is its factorised AoE form,
which starts from the scorer's cache C_i = x Wdown_i instead of recomputing x Wg_i (DESIGN.md section 1, step 4).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aoe_ep.config import MoEConfig


def _init(tensor: torch.Tensor, fan_in: int) -> None:
    nn.init.normal_(tensor, std=fan_in ** -0.5)


class SwiGLUExperts(nn.Module):
    """E_i(x) = (SiLU(x Wg_i) ⊙ x Wp_i) Wo_i."""

    def __init__(self, cfg: MoEConfig, num_experts: int):
        super().__init__()
        d, f = cfg.d_model, cfg.d_ffn
        self.w_gate = nn.Parameter(torch.empty(num_experts, d, f))
        self.w_p = nn.Parameter(torch.empty(num_experts, d, f))
        self.w_o = nn.Parameter(torch.empty(num_experts, f, d))
        _init(self.w_gate, d), _init(self.w_p, d), _init(self.w_o, f)

    def forward(self, x_MD: torch.Tensor, counts: Sequence[int], cache_ML: Optional[torch.Tensor] = None) -> torch.Tensor:
        # unbind, not w[e]: indexing a parameter E times would make backward allocate E full-size gradients.
        weights = zip(self.w_gate.unbind(0), self.w_p.unbind(0), self.w_o.unbind(0))
        outs = []
        for x_mD, (w_gate_DF, w_p_DF, w_o_FD) in zip(torch.split(x_MD, list(counts)), weights):
            h_mF = F.silu(x_mD @ w_gate_DF) * (x_mD @ w_p_DF)
            outs.append(h_mF @ w_o_FD)
        return torch.cat(outs) if outs else x_MD.new_zeros(0, x_MD.shape[1])


class AoEExperts(nn.Module):
    """E_i(x) = (SiLU(C_i Wup_i) ⊙ x Wp_i) Wo_i, with C_i = x Wdown_i taken from the scorer's cache.

    With `own_down` the experts hold Wdown themselves and compute C_i on their rows only: the factorised experts of
    a routed MoE (the paper's Table 2 config 3), where nothing else computes the cache.
    """

    def __init__(self, cfg: MoEConfig, num_experts: int, own_down: bool = False):
        super().__init__()
        d, low, wide = cfg.d_model, cfg.d_low, cfg.d_wide
        self.w_down = None
        if own_down:
            self.w_down = nn.Parameter(torch.empty(num_experts, d, low))
            _init(self.w_down, d)
        self.w_up = nn.Parameter(torch.empty(num_experts, low, wide))
        self.w_p = nn.Parameter(torch.empty(num_experts, d, wide))
        self.w_o = nn.Parameter(torch.empty(num_experts, wide, d))
        _init(self.w_up, low), _init(self.w_p, d), _init(self.w_o, wide)

    def forward(self, x_MD: torch.Tensor, counts: Sequence[int], cache_ML: Optional[torch.Tensor] = None) -> torch.Tensor:
        counts = list(counts)
        if (cache_ML is None) == (self.w_down is None):
            raise ValueError("factorised experts take the scorer's cache exactly when they hold no Wdown themselves")
        x_splits = torch.split(x_MD, counts)
        if cache_ML is None:
            c_splits = [x_mD @ w_down_DL for x_mD, w_down_DL in zip(x_splits, self.w_down.unbind(0))]
        else:
            c_splits = torch.split(cache_ML, counts)
        weights = zip(self.w_up.unbind(0), self.w_p.unbind(0), self.w_o.unbind(0))
        outs = []
        for x_mD, c_mL, (w_up_LW, w_p_DW, w_o_WD) in zip(x_splits, c_splits, weights):
            h_mW = F.silu(c_mL @ w_up_LW) * (x_mD @ w_p_DW)
            outs.append(h_mW @ w_o_WD)
        return torch.cat(outs) if outs else x_MD.new_zeros(0, x_MD.shape[1])


def build_experts(cfg: MoEConfig, num_experts: Optional[int] = None) -> nn.Module:
    """The experts of `cfg`; `num_experts` is how many this rank holds (all of them on one device)."""
    n = cfg.num_experts if num_experts is None else num_experts
    if cfg.factorized:
        return AoEExperts(cfg, n, own_down=cfg.scorer != "aoe")
    return SwiGLUExperts(cfg, n)
