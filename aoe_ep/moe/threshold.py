"""The adaptive weight of threshold selection's balancing loss (Routing-Free MoE, arXiv 2604.00801).

Under `moe.selection: threshold` each MoE layer holds λ (the buffer `threshold_lambda`, from
`moe.threshold_lambda_init`) that multiplies its L_LB (`aoe_ep.moe.losses.threshold_balance_loss`). After every
applied optimiser step it moves toward the target density ρ* = `moe.threshold_density`,

    λ <- min(1, λ·(1 + η)^sign(ρ − ρ*)),

where ρ is the fraction of (token, expert) pairs that fired in that step: all micro-batches, over the whole
data-parallel world. Too many experts firing raises the weight of the loss that pushes G down; too few lowers it.
As for `moe.balance: bias` (aoe_ep/moe/balance.py) the counts are the step's global ones, formed in its one
world-wide reduction, so λ is the same number on every rank; the layer's scheme
(`aoe_ep.moe.balancing.ThresholdBalancing`) reads the buffer in its loss and moves it by `lambda_update`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from aoe_ep.moe.layer import MoEInfo

LAMBDA_MAX = 1.0  # the Routing-Free repository caps λ at 1


def lambda_update(lam: torch.Tensor, density: torch.Tensor | float, target: float, eta: float) -> torch.Tensor:
    """min(1, λ·(1 + η)^sign(ρ − ρ*)); ρ = ρ* leaves λ where it is."""
    direction = torch.sign(torch.as_tensor(density, dtype=torch.float64) - target)
    return torch.clamp(
        lam * torch.pow(torch.as_tensor(1.0 + eta, dtype=torch.float64), direction).to(lam.dtype), max=LAMBDA_MAX
    )


def step_tokens(infos: Sequence[Sequence[MoEInfo]], device: torch.device) -> torch.Tensor:
    """[1] float64: Σ over the step's micro-batches of the tokens one MoE layer saw (global over its EP group; every
    layer sees the same tokens); `infos` as for `aoe_ep.moe.balance.step_token_counts`."""
    return torch.tensor(
        [float(sum(micro[0].stats.num_tokens for micro in infos if micro))], dtype=torch.float64, device=device
    )


def step_density(counts_LE: torch.Tensor, num_tokens: torch.Tensor | float) -> torch.Tensor:
    """[L] float64: ρ per layer, the fired (token, expert) pairs of the step over all of its n·T pairs."""
    pairs = counts_LE.shape[1] * torch.as_tensor(num_tokens, dtype=torch.float64, device=counts_LE.device)
    return counts_LE.double().sum(dim=1) / pairs.clamp_min(1)
