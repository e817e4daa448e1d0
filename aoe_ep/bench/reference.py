"""The obvious AoE layer, for `aoe-ep bench layer` to time the fast path against (its `loop_reference` contender).

One `nn.Linear` per expert and projection, a Python loop over experts with a boolean mask per expert, as the
AoE baselines of public Routing-Free MoE code are written: every expert computes its cache for every token, is
ranked by the cache's L2 norm, and the top-K finish on the tokens that chose them. Same FLOPs, outputs and aux
loss as `MoELayer` with `scorer: aoe`, the same tie rule (a stable descending sort: the lower expert index first;
`torch.topk` promises no order among ties); nothing here is shared with the package's layer. It is a speed
baseline: the statement of the layer's math to check against is `aoe_ep/moe/reference.py`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from aoe_ep.config import MoEConfig


class LoopAoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        d, low, wide, n = cfg.d_model, cfg.d_low, cfg.d_wide, cfg.num_experts
        self.cfg = cfg
        self.down = nn.ModuleList(nn.Linear(d, low, bias=False) for _ in range(n))
        self.up = nn.ModuleList(nn.Linear(low, wide, bias=False) for _ in range(n))
        self.proj = nn.ModuleList(nn.Linear(d, wide, bias=False) for _ in range(n))
        self.out = nn.ModuleList(nn.Linear(wide, d, bias=False) for _ in range(n))

    def forward(self, x: torch.Tensor):
        cfg = self.cfg
        caches = [down(x) for down in self.down]
        scores = torch.stack([c.norm(dim=-1) for c in caches], dim=1)
        top_idx = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : cfg.top_k]
        top_scores = scores.gather(1, top_idx)
        gates = torch.softmax(top_scores, dim=1)
        probs = torch.softmax(scores, dim=1)
        y = torch.zeros_like(x)
        for i in range(cfg.num_experts):
            chosen = top_idx == i
            rows = chosen.any(dim=1)
            if not rows.any():
                continue
            gate = (gates * chosen).sum(dim=1)[rows].unsqueeze(1)
            h = F.silu(self.up[i](caches[i][rows])) * self.proj[i](x[rows])
            y[rows] += gate * self.out[i](h)
        counts = F.one_hot(top_idx, cfg.num_experts).sum(dim=(0, 1)).to(x.dtype)
        aux = cfg.aux_loss_coeff * cfg.num_experts * (counts / x.shape[0] * probs.mean(dim=0)).sum()
        return y, SimpleNamespace(aux_loss=aux)
