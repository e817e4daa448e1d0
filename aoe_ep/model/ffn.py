"""The dense SwiGLU FFN: the baseline an MoE layer's active compute is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseSwiGLU(nn.Module):
    """y = (SiLU(x Wg) ⊙ x Wp) Wo, the Llama FFN."""

    def __init__(self, d_model: int, d_ffn: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(d_model, d_ffn))
        self.w_p = nn.Parameter(torch.empty(d_model, d_ffn))
        self.w_o = nn.Parameter(torch.empty(d_ffn, d_model))
        for w, fan_in in ((self.w_gate, d_model), (self.w_p, d_model), (self.w_o, d_ffn)):
            nn.init.normal_(w, std=fan_in**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate) * (x @ self.w_p)) @ self.w_o
