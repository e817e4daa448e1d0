"""Auxiliary losses: load balancing (Eq. 2 for routers, Eq. 6 for AoE) and top-P's confidence-entropy regulariser.

Both are written as sums over local tokens divided by the global token count, so that under expert or data
parallelism the per-rank values add up to the single-device loss over the global batch.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

from aoe_ep.config import MoEConfig
from aoe_ep.moe.stats import BatchSums


def token_entropy(s_TE: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
    """H(softmax(s)) per token (Eq. 8's Ent_conf before the mean), via log_softmax so that p = 0 is harmless."""
    return -(probs_TE * torch.log_softmax(s_TE, dim=1)).sum(dim=1)


def _global_value(own: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The global value `total`, differentiable through this rank's part `own` only: summed over ranks, the
    gradients equal those of the single-device loss, and every rank reports the same number."""
    return own + (total - own).detach()


def load_balancing_loss(probs_own_TE: torch.Tensor, sums: BatchSums, coeff: float) -> torch.Tensor:
    """α·n·Σ f_i·P_i with f_i = tokens_per_expert/T (sums to K for top-K) and P_i = mean softmax probability.

    megatron-core's switch loss normalises f_i by K·T; passing topk=1 gives the paper's f_i over T. It sums its
    `probs` over rows, so it gets the one row of global probability sums.
    """
    if sums.num_tokens == 0:
        return probs_own_TE.sum() * 0.0
    probs_sum_1E = _global_value(probs_own_TE.sum(dim=0), sums.probs_sum.to(probs_own_TE.dtype)).unsqueeze(0)
    return switch_load_balancing_loss_func(
        probs=probs_sum_1E, tokens_per_expert=sums.tokens_per_expert.to(probs_own_TE.dtype),
        total_num_tokens=sums.num_tokens, topk=1, num_experts=probs_own_TE.shape[1], moe_aux_loss_coeff=coeff)


def aux_loss(cfg: MoEConfig, probs_own_TE: torch.Tensor, entropy_own_T: torch.Tensor, sums: BatchSums) -> torch.Tensor:
    """The layer's auxiliary loss for its selection strategy over the EP group's batch; expert choice needs none
    (Zhou et al., 2022), and the load-balancing term applies only under `moe.balance: aux`. `*_own` are this rank's
    tokens, `sums` the global detached sums."""
    if cfg.selection == "expert_choice":
        return probs_own_TE.sum() * 0.0
    loss = load_balancing_loss(probs_own_TE, sums, cfg.load_balancing_coeff)
    if cfg.selection == "top_p":
        entropy = _global_value(entropy_own_T.sum(), sums.entropy_sum.to(entropy_own_T.dtype))
        loss = loss + cfg.top_p_entropy_coeff * entropy / max(sums.num_tokens, 1)
    return loss
