"""Experts, stacked [E, ...] and run on rows already grouped per expert, one grouped product per projection.

`SwiGLUExperts` is the Llama expert of the routed MoE and Self-Routing; `AoEExperts` is its factorised AoE form,
which starts from the scorer's cache C_i = x Wdown_i instead of recomputing x Wg_i (docs/design.md section 1.4).

Both run through one `autograd.Function`, `_GroupedGLU`: y = (SiLU(g Wg_e) ⊙ x Wp_e) Wo_e with g = x (SwiGLU) or
g = C (AoE). It saves x, g and the two pre-activations and recomputes SiLU and the product in backward (megablocks
does the same), and writes each weight gradient as one [E, ...] tensor: autograd never stacks per-expert pieces.
With `recompute_activations` set (selective activation checkpointing sets it) it saves x and g only and recomputes
the two pre-activations g Wg_e and x Wp_e in backward as well, with the forward's kernel and layout, so the
gradients are bit for bit those of the saving path: two of the three expert products run again, and the two
[M, W] tensors, the widest an expert layer keeps, are not held between forward and backward. The rows x and g are
this rank's own (after any dispatch), so nothing is communicated again.
Under autocast the rows and weights run in the autocast dtype; the weight gradients come back in the parameters'.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aoe_ep.config import MoEConfig
from aoe_ep.moe.grouped import Groups, choose_kernel, gmm, gmm_wgrad, pad_to, strided_empty
from aoe_ep.moe.losses import erc_gate_norms


def _init(tensor: torch.Tensor, fan_in: int) -> None:
    nn.init.normal_(tensor, std=fan_in**-0.5)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype expert matmuls run in: autocast's for the rows' device when it is on, else the rows' own."""
    if x.dtype.is_floating_point and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _t(w_EIN: torch.Tensor) -> torch.Tensor:
    return w_EIN.transpose(1, 2)


class _GroupedGLU(torch.autograd.Function):
    """`grouped`: one grouped product per projection over all rows. `loop`: the whole chain expert by expert, so
    that each expert's [rows, F] intermediates are still in cache for the elementwise steps (on CPU that is what
    beats a chain of whole-batch products)."""

    @staticmethod
    def forward(ctx, x_MD, g_MI, w_gate_EIF, w_p_EDF, w_o_EFD, groups: Groups, kernel: str, recompute: bool):
        if kernel == "grouped":
            a_MF = gmm(g_MI, w_gate_EIF, groups, kernel)
            b_MF = gmm(x_MD, w_p_EDF, groups, kernel)
            y_MD = gmm(F.silu(a_MF).mul_(b_MF), w_o_EFD, groups, kernel)
        else:
            width = w_gate_EIF.shape[2]
            a_MF, b_MF = strided_empty((x_MD.shape[0], width), x_MD), strided_empty((x_MD.shape[0], width), x_MD)
            y_MD = x_MD.new_empty(x_MD.shape[0], w_o_EFD.shape[2])
            for e, rows in groups.spans():
                torch.mm(g_MI[rows], w_gate_EIF[e], out=a_MF[rows])
                torch.mm(x_MD[rows], w_p_EDF[e], out=b_MF[rows])
                torch.mm(F.silu(a_MF[rows]).mul_(b_MF[rows]), w_o_EFD[e], out=y_MD[rows])
        if recompute:
            ctx.save_for_backward(x_MD, g_MI, w_gate_EIF, w_p_EDF, w_o_EFD)
        else:
            ctx.save_for_backward(x_MD, g_MI, w_gate_EIF, w_p_EDF, w_o_EFD, a_MF, b_MF)
        ctx.groups, ctx.kernel, ctx.recompute = groups, kernel, recompute
        return y_MD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_MD):
        x_MD, g_MI, w_gate_EIF, w_p_EDF, w_o_EFD, *kept = ctx.saved_tensors
        groups, kernel, width = ctx.groups, ctx.kernel, w_gate_EIF.shape[2]
        need_x, need_g = ctx.needs_input_grad[:2]
        dy_MD = dy_MD.contiguous().to(x_MD.dtype)  # e.g. an expanded gradient from y.sum()
        if kernel == "grouped":
            a_MF, b_MF = kept if kept else (gmm(g_MI, w_gate_EIF, groups, kernel), gmm(x_MD, w_p_EDF, groups, kernel))
            silu_MF = F.silu(a_MF)
            dw_o = gmm_wgrad(silu_MF * b_MF, dy_MD, groups, kernel)
            dh_MF = gmm(dy_MD, _t(w_o_EFD), groups, kernel)
            db_MF = dh_MF * silu_MF
            da_MF = torch.ops.aten.silu_backward(dh_MF.mul_(b_MF), a_MF)
            dx_MD = gmm(db_MF, _t(w_p_EDF), groups, kernel) if need_x else None
            dw_p = gmm_wgrad(x_MD, db_MF, groups, kernel)
            dg_MI = gmm(da_MF, _t(w_gate_EIF), groups, kernel) if need_g else None
            dw_gate = gmm_wgrad(g_MI, da_MF, groups, kernel)
            return dx_MD, dg_MI, dw_gate, dw_p, dw_o, None, None, None
        # recomputed pre-activations go where the forward wrote them: the same row layout, the same products
        a_MF, b_MF = kept if kept else (strided_empty((x_MD.shape[0], width), x_MD) for _ in range(2))
        # an expert without rows gets a zero gradient; the others are written whole below. Products as wide as the
        # hidden layer are written with rows 64 bytes apart (`row_stride`), the weight gradients included: the
        # strided [E, K, F] views cost one copy each into the parameters' layout, far less than the slow writes.
        zero = 0 in groups.host
        dw_gate, dw_p = strided_empty(w_gate_EIF.shape, x_MD, zero), strided_empty(w_p_EDF.shape, x_MD, zero)
        dw_o = torch.zeros_like(w_o_EFD) if zero else torch.empty_like(w_o_EFD)
        dx_MD = torch.empty_like(x_MD) if need_x else None
        dg_MI = torch.empty_like(g_MI) if need_g else None
        dh_MF = strided_empty((x_MD.shape[0], width), x_MD)
        for e, rows in groups.spans():
            a_mF, b_mF, dy_mD = a_MF[rows], b_MF[rows], dy_MD[rows]
            if ctx.recompute:
                torch.mm(g_MI[rows], w_gate_EIF[e], out=a_mF)
                torch.mm(x_MD[rows], w_p_EDF[e], out=b_mF)
            silu_mF = F.silu(a_mF)
            torch.mm((silu_mF * b_mF).t(), dy_mD, out=dw_o[e])
            dh_mF = torch.mm(dy_mD, w_o_EFD[e].t(), out=dh_MF[rows])
            db_mF = dh_mF * silu_mF
            da_mF = torch.ops.aten.silu_backward(dh_mF.mul_(b_mF), a_mF)
            torch.mm(x_MD[rows].t(), db_mF, out=dw_p[e])
            torch.mm(g_MI[rows].t(), da_mF, out=dw_gate[e])
            if need_x:
                torch.mm(db_mF, w_p_EDF[e].t(), out=dx_MD[rows])
            if need_g:
                torch.mm(da_mF, w_gate_EIF[e].t(), out=dg_MI[rows])
        return dx_MD, dg_MI, dw_gate, dw_p, dw_o, None, None, None


class _GroupedLinear(torch.autograd.Function):
    """y[m] = x[m] @ w[e(m)]: the factorised experts' own Wdown (Table 2 config 3)."""

    @staticmethod
    def forward(ctx, x_MI, w_EIN, groups: Groups, kernel: str):
        ctx.save_for_backward(x_MI, w_EIN)
        ctx.groups, ctx.kernel = groups, kernel
        return gmm(x_MI, w_EIN, groups, kernel)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_MN):
        x_MI, w_EIN = ctx.saved_tensors
        dy_MN = dy_MN.contiguous().to(x_MI.dtype)
        dx_MI = gmm(dy_MN, _t(w_EIN), ctx.groups, ctx.kernel) if ctx.needs_input_grad[0] else None
        return dx_MI, gmm_wgrad(x_MI, dy_MN, ctx.groups, ctx.kernel), None, None


def _pad_last(w: torch.Tensor, width: int) -> torch.Tensor:
    return w if w.shape[-1] == width else F.pad(w, (0, width - w.shape[-1]))


def _pad_middle(w: torch.Tensor, width: int) -> torch.Tensor:
    return w if w.shape[1] == width else F.pad(w, (0, 0, 0, width - w.shape[1]))


def grouped_glu(
    x_MD: torch.Tensor,
    g_MI: torch.Tensor,
    w_gate_EIF: torch.Tensor,
    w_p_EDF: torch.Tensor,
    w_o_EFD: torch.Tensor,
    groups: Groups,
    kernel: str = "auto",
    recompute: bool = False,
) -> torch.Tensor:
    """(SiLU(g Wg_e) ⊙ x Wp_e) Wo_e for every row, in the compute dtype. The `grouped` kernel wants 16-byte-aligned
    strides: a hidden width that is not (the 4B preset's d_wide = 6470 in bf16) is zero-padded, which changes no
    result; input widths that are not (only odd test shapes) run the `loop` kernel. `recompute`: keep only the rows
    for backward and compute g Wg_e and x Wp_e again there."""
    dtype = compute_dtype(x_MD)
    kernel = choose_kernel(
        kernel,
        x_MD.device,
        dtype,
        widths=(x_MD.shape[1], g_MI.shape[1]),
        rows_per_group=x_MD.shape[0] / max(groups.num_groups, 1),
    )
    width = w_gate_EIF.shape[2]
    if kernel == "grouped":
        width = pad_to(width, dtype)
    same_input = g_MI is x_MD
    x_MD, w_gate_EIF, w_p_EDF, w_o_EFD = (t.to(dtype) for t in (x_MD, w_gate_EIF, w_p_EDF, w_o_EFD))
    g_MI = x_MD if same_input else g_MI.to(dtype)
    w_gate_EIF, w_p_EDF, w_o_EFD = _pad_last(w_gate_EIF, width), _pad_last(w_p_EDF, width), _pad_middle(w_o_EFD, width)
    return _GroupedGLU.apply(x_MD, g_MI, w_gate_EIF, w_p_EDF, w_o_EFD, groups, kernel, recompute)


def grouped_linear(x_MI: torch.Tensor, w_EIN: torch.Tensor, groups: Groups, kernel: str = "auto") -> torch.Tensor:
    dtype = compute_dtype(x_MI)
    kernel = choose_kernel(
        kernel,
        x_MI.device,
        dtype,
        widths=tuple(w_EIN.shape[1:]),
        rows_per_group=x_MI.shape[0] / max(groups.num_groups, 1),
    )
    return _GroupedLinear.apply(x_MI.to(dtype), w_EIN.to(dtype), groups, kernel)


class SwiGLUExperts(nn.Module):
    """E_i(x) = (SiLU(x Wg_i) ⊙ x Wp_i) Wo_i. `recompute_activations` (off; selective activation checkpointing
    turns it on): keep only the rows for backward, recompute the pre-activations there (see `_GroupedGLU`)."""

    def __init__(self, cfg: MoEConfig, num_experts: int):
        super().__init__()
        d, f = cfg.d_model, cfg.d_ffn
        self.kernel = cfg.expert_kernel
        self.recompute_activations = False
        self.w_gate = nn.Parameter(torch.empty(num_experts, d, f))
        self.w_p = nn.Parameter(torch.empty(num_experts, d, f))
        self.w_o = nn.Parameter(torch.empty(num_experts, f, d))
        _init(self.w_gate, d), _init(self.w_p, d), _init(self.w_o, f)

    def forward(
        self,
        x_MD: torch.Tensor,
        groups: Groups,
        cache_MR: Optional[torch.Tensor] = None,
        gate_norms_of: Optional[torch.Tensor] = None,
    ):
        """The experts' outputs for the grouped rows; with `gate_norms_of` (rows [N, d]) also ‖row · Wg_j‖ for every
        held expert j, [N, E] (the ERC loss), from the same call: FSDP2 gathers the weights once and reduces their
        gradient once (a second differentiable call of a sharded module would be reduced apart)."""
        y_MD = grouped_glu(x_MD, x_MD, self.w_gate, self.w_p, self.w_o, groups, self.kernel, self.recompute_activations)
        return y_MD if gate_norms_of is None else (y_MD, erc_gate_norms(gate_norms_of, self.w_gate))


class AoEExperts(nn.Module):
    """E_i(x) = (SiLU(C_i Wup_i) ⊙ x Wp_i) Wo_i, with C_i = x Wdown_i taken from the scorer's cache.

    With `own_down` the experts hold Wdown themselves and compute C_i on their rows only: the factorised experts of
    a routed MoE (the paper's Table 2 config 3), where nothing else computes the cache. `recompute_activations`
    as for `SwiGLUExperts`.
    """

    def __init__(self, cfg: MoEConfig, num_experts: int, own_down: bool = False):
        super().__init__()
        d, low, wide = cfg.d_model, cfg.d_low, cfg.d_wide
        self.kernel = cfg.expert_kernel
        self.recompute_activations = False
        self.w_down = None
        if own_down:
            self.w_down = nn.Parameter(torch.empty(num_experts, d, low))
            _init(self.w_down, d)
        self.w_up = nn.Parameter(torch.empty(num_experts, low, wide))
        self.w_p = nn.Parameter(torch.empty(num_experts, d, wide))
        self.w_o = nn.Parameter(torch.empty(num_experts, wide, d))
        _init(self.w_up, low), _init(self.w_p, d), _init(self.w_o, wide)

    def forward(
        self,
        x_MD: torch.Tensor,
        groups: Groups,
        cache_MR: Optional[torch.Tensor] = None,
        gate_norms_of: Optional[torch.Tensor] = None,
    ):
        """As `SwiGLUExperts.forward`; the gate projection is Wdown_j·Wup_j, applied as two products."""
        if gate_norms_of is not None and self.w_down is None:
            raise ValueError("the gate projection of AoE experts starts from the scorer's Wdown, not their own")
        if (cache_MR is None) == (self.w_down is None):
            raise ValueError("factorised experts take the scorer's cache exactly when they hold no Wdown themselves")
        if cache_MR is None:
            cache_MR = grouped_linear(x_MD, self.w_down, groups, self.kernel)
        y_MD = grouped_glu(
            x_MD, cache_MR, self.w_up, self.w_p, self.w_o, groups, self.kernel, self.recompute_activations
        )
        return y_MD if gate_norms_of is None else (y_MD, erc_gate_norms(gate_norms_of, (self.w_down, self.w_up)))


def build_experts(cfg: MoEConfig, num_experts: Optional[int] = None) -> nn.Module:
    """The experts of `cfg`; `num_experts` is how many this rank holds (all of them on one device)."""
    n = cfg.num_experts if num_experts is None else num_experts
    if cfg.factorized:
        return AoEExperts(cfg, n, own_down=cfg.scorer != "aoe")
    return SwiGLUExperts(cfg, n)
