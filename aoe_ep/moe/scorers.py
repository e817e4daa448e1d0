"""Scorers: what ranks the experts for each token (docs/design.md section 1).

Each scorer maps x_TD to `Scores`: the score matrix s_TE over the experts it holds, which the decision reads, and
`attach(rows)`, which returns the differentiable scores and, for AoE, the low-rank cache rows of the (token,
expert) pairs that will run. All three share that interface, so selection, losses and dispatch never ask which
scorer they are talking to. Scores are at least fp32 whatever the activation dtype.

AoE computes its cache C_i = x Wdown_i for every (token, expert) before anything is decided, but keeps for backward
only what the gradient needs (`_LowRankScores`): with the `softmax_topk` gate and neither aux loss nor top-P
entropy, an unselected expert's score gets no gradient, so only the selected rows are kept and Wdown's backward runs
over them alone; otherwise the unselected scores get ∂L/∂s_j along ∂‖C_j‖/∂C_j, from the kept cache
(`moe.aoe_cache: keep`, [T, n, d_low] saved) or from the cache recomputed in backward (`recompute`, nothing saved).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aoe_ep.config import MoEConfig
from aoe_ep.moe.experts import compute_dtype
from aoe_ep.moe.grouped import choose_kernel, gmm, gmm_wgrad
from aoe_ep.moe.routing import GroupedRows
from aoe_ep.moe.selection import at_least_fp32

Attach = Callable[[GroupedRows, Optional[torch.Tensor]], tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass(frozen=True)
class Scores:
    """s_TE: one score per (token, expert) for the decision (AoE's carries no gradient; call `attach`).
    attach(rows, x_MD) -> (s_TE with its gradient, the cache rows C [M, d_low] of `rows` or None); x_MD are the
    rows' tokens (x[rows.token_index_M]), which AoE's sparse backward reuses."""

    s_TE: torch.Tensor
    attach: Attach


def _no_cache(s_TE: torch.Tensor) -> Scores:
    return Scores(s_TE=s_TE, attach=lambda rows, x_MD=None: (s_TE, None))


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
            nn.init.normal_(self.w_hidden, std=cfg.d_model**-0.5)
        self.weight = nn.Parameter(torch.empty(num_experts, width))
        nn.init.normal_(self.weight, std=width**-0.5)

    def forward(self, x_TD: torch.Tensor) -> Scores:
        h_TG = x_TD if self.w_hidden is None else F.silu(x_TD @ self.w_hidden)
        return _no_cache(at_least_fp32(h_TG @ self.weight.t()))


# AoE's norms (Appendix A) as vector-norm orders.
NORM_ORDERS = {"l2": 2.0, "l1": 1.0, "linf": float("inf")}


def _norm(c: torch.Tensor, ord: float) -> torch.Tensor:
    return torch.linalg.vector_norm(at_least_fp32(c), ord=ord, dim=-1)


def activation_norm(a_TEW: torch.Tensor, norm: str) -> torch.Tensor:
    """The score AoE gives an activation: its norm `norm` ("l2" | "l1" | "linf") over the last dimension, at least
    fp32: [..., X] -> [...]."""
    if norm not in NORM_ORDERS:
        raise ValueError(f"norm: {norm!r} is not one of {', '.join(NORM_ORDERS)}")
    return _norm(a_TEW, NORM_ORDERS[norm])


def _norm_grad(c: torch.Tensor, ord: float, ds: torch.Tensor, s: Optional[torch.Tensor] = None) -> torch.Tensor:
    """∂L/∂c from ∂L/∂‖c‖ for each row of c, exactly as autograd differentiates the norm: L2 written out
    (c · ds/‖c‖, zero where ‖c‖ = 0; `s` = ‖c‖ when known), the others (ties of L∞ included) through autograd."""
    if ord == 2.0:
        s = _norm(c, ord) if s is None else s
        scale = (ds / s).masked_fill_(s == 0, 0.0)
        return at_least_fp32(c) * scale.unsqueeze(-1)
    with torch.enable_grad():
        c = c.detach().requires_grad_()
        (dc,) = torch.autograd.grad(_norm(c, ord), c, ds)
    return dc


class _LowRankScores(torch.autograd.Function):
    """Differentiable (s_TE, C rows) from the cache computed without autograd; what it saves depends on `mode`:
    "sparse" the selected rows (shared with the experts), "keep" the whole cache, "recompute" nothing."""

    @staticmethod
    def forward(ctx, x_TD, x_MD, w_down_EDR, s_TE, cache_TER, token_index_M, expert_index_M, groups, mode, ord):
        cache_MR = cache_TER[token_index_M, expert_index_M]
        saved_x = x_MD if mode == "sparse" else x_TD
        saved_cache = cache_TER if mode == "keep" else cache_TER.new_empty(0)
        ctx.save_for_backward(saved_x, w_down_EDR, saved_cache, cache_MR, token_index_M, expert_index_M, s_TE)
        ctx.groups, ctx.mode, ctx.ord = groups, mode, ord
        ctx.kernel = choose_kernel(
            "auto",
            x_TD.device,
            x_TD.dtype,
            widths=tuple(w_down_EDR.shape[1:]),
            rows_per_group=x_MD.shape[0] / max(groups.num_groups, 1),
        )
        return s_TE.clone(), cache_MR

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds_TE, dcache_MR):
        x, w_down_EDR, cache_TER, cache_MR, token_index_M, expert_index_M, s_TE = ctx.saved_tensors
        num_experts, d_model, d_low = w_down_EDR.shape
        dcache_MR = torch.zeros_like(cache_MR) if dcache_MR is None else dcache_MR.to(cache_MR.dtype)
        if ds_TE is None:
            ds_TE = cache_MR.new_zeros(())
        if ctx.mode == "sparse":  # unselected scores have no gradient: Wdown's backward over the selected rows only
            if ds_TE.dim():
                dcache_MR = dcache_MR + _norm_grad(cache_MR, ctx.ord, ds_TE[token_index_M, expert_index_M]).to(
                    cache_MR.dtype
                )
            dx_MD = None
            if ctx.needs_input_grad[1]:
                dx_MD = gmm(dcache_MR, w_down_EDR.transpose(1, 2), ctx.groups, ctx.kernel)
            return None, dx_MD, gmm_wgrad(x, dcache_MR, ctx.groups, ctx.kernel), *([None] * 7)
        w_down_DW = w_down_EDR.permute(1, 0, 2).reshape(d_model, num_experts * d_low)
        if ctx.mode == "recompute":
            cache_TER = (x @ w_down_DW).view(x.shape[0], num_experts, d_low)
        dcache_TER = _norm_grad(cache_TER, ctx.ord, ds_TE.expand(cache_TER.shape[:2]), s_TE).to(cache_TER.dtype)
        dcache_TER = dcache_TER.contiguous()
        dcache_TER.index_put_((token_index_M, expert_index_M), dcache_MR, accumulate=True)
        dcache_TW = dcache_TER.view(x.shape[0], num_experts * d_low)
        dx_TD = dcache_TW @ w_down_DW.t() if ctx.needs_input_grad[0] else None
        dw_down = (x.t() @ dcache_TW).view(d_model, num_experts, d_low).permute(1, 0, 2)
        return dx_TD, None, dw_down, *([None] * 7)


class AoEScorer(nn.Module):
    """AoE self-evaluation, Eq. 6: every expert computes its cache C_i = x Wdown_i, scored by ||C_i|| (App. A norms).

    All experts' Wdown are stacked [E, d, d_low] and applied as one [d, E·d_low] matmul.
    """

    def __init__(self, cfg: MoEConfig, num_experts: int):
        super().__init__()
        self.ord = NORM_ORDERS[cfg.norm]
        self.mode = cfg.aoe_cache if cfg.unselected_get_gradient else "sparse"
        self.w_down = nn.Parameter(torch.empty(num_experts, cfg.d_model, cfg.d_low))
        nn.init.normal_(self.w_down, std=cfg.d_model**-0.5)

    def cache(self, x_TD: torch.Tensor) -> torch.Tensor:
        num_experts, d_model, d_low = self.w_down.shape
        w_down_DW = self.w_down.to(x_TD.dtype).permute(1, 0, 2).reshape(d_model, num_experts * d_low)
        return (x_TD @ w_down_DW).view(x_TD.shape[0], num_experts, d_low)

    def forward(self, x_TD: torch.Tensor, attach_to: Optional[tuple] = None):
        """Score x_TD; or, with `attach_to`, the differentiable (s_TE, cache rows) of an earlier scoring. Both go
        through the module's `__call__`, so that wrappers which gather sharded parameters around a forward (FSDP2)
        see the second use of Wdown too."""
        if attach_to is not None:
            return _LowRankScores.apply(*attach_to[:2], self.w_down.to(x_TD.dtype), *attach_to[2:], self.mode, self.ord)
        x_TD = x_TD.to(compute_dtype(x_TD))
        with torch.no_grad():
            cache_TER = self.cache(x_TD)
            s_TE = _norm(cache_TER, self.ord)

        def attach(rows: GroupedRows, x_MD: Optional[torch.Tensor] = None):
            x_MD = x_TD[rows.token_index_M] if x_MD is None else x_MD.to(x_TD.dtype)
            return self(
                x_TD, attach_to=(x_TD, x_MD, s_TE, cache_TER, rows.token_index_M, rows.expert_index_M, rows.groups)
            )

        return Scores(s_TE=s_TE, attach=attach)


class SelfRoutingScorer(nn.Module):
    """Self-Routing: the expert logits are a slice of the hidden state itself; no parameters."""

    def __init__(self, cfg: MoEConfig, num_experts: int):
        super().__init__()
        self.offset = cfg.self_routing_offset
        self.num_experts = num_experts

    def forward(self, x_TD: torch.Tensor) -> Scores:
        return _no_cache(at_least_fp32(x_TD[:, self.offset : self.offset + self.num_experts]))


SCORERS = {"router": RouterScorer, "aoe": AoEScorer, "self_routing": SelfRoutingScorer}


def scorer_sharded_over_ep(cfg: MoEConfig, ep_size: int) -> bool:
    """Whether the scorer's weight is split over an EP group of `ep_size` like the experts: AoE's Wdown under
    `allgather` (each rank scores only its own experts). The router, and AoE's Wdown under `alltoall`, are
    replicated like a dense weight."""
    return ep_size > 1 and cfg.scorer == "aoe" and cfg.dispatcher == "allgather"


def build_scorer(cfg: MoEConfig, num_experts: Optional[int] = None) -> nn.Module:
    """The scorer of `cfg`; `num_experts` lets an expert-parallel rank hold only its own AoE selectors."""
    return SCORERS[cfg.scorer](cfg, cfg.num_experts if num_experts is None else num_experts)
