"""Rank-R factorisation of an expert's gate projection, as AoE stores it: W_g [d, f] ≈ W_down [d, R] · W_up [R, f].

The truncated SVD W_g ≈ U_R Σ_R V_Rᵀ gives W_down = U_R Σ_R^½ and W_up = Σ_R^½ V_Rᵀ: the singular values split
evenly between the two factors. The product is the best rank-R approximation whatever the split; the split decides
what ‖x W_down‖, AoE's score, measures: ‖x U_R Σ_R^½‖, not the norm ‖x U_R Σ_R‖ = ‖x W_g,R‖ of the rank-R gate
activation itself. `aoe-ep import --to aoe` writes these factors and `aoe-ep router-free --d-low` computes with them.
"""

from __future__ import annotations

import torch


def factorise(w_gate_DF: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(W_down [d, R], W_up [R, f], relative Frobenius error ‖W_g − W_down W_up‖_F / ‖W_g‖_F, share of ‖W_g‖_F² the
    kept singular values hold) of the rank-R truncated SVD, computed in float64 and returned in W_g's dtype."""
    if not 0 < rank <= min(w_gate_DF.shape):
        raise ValueError(f"rank {rank}: must lie in [1, {min(w_gate_DF.shape)}] for a {tuple(w_gate_DF.shape)} matrix")
    w = w_gate_DF.double()
    u_DJ, s_J, vt_JF = torch.linalg.svd(w, full_matrices=False)
    root_R = s_J[:rank].sqrt()
    down_DR = u_DJ[:, :rank] * root_R
    up_RF = root_R[:, None] * vt_JF[:rank]
    norm = torch.linalg.matrix_norm(w)
    error = float(torch.linalg.matrix_norm(w - down_DR @ up_RF) / norm) if norm > 0 else 0.0
    energy = float((s_J[:rank] ** 2).sum() / (s_J**2).sum()) if norm > 0 else 1.0
    return down_DR.to(w_gate_DF.dtype), up_RF.to(w_gate_DF.dtype), error, energy
