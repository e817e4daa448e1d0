"""Auxiliary losses: load balancing (Eq. 2 for routers, Eq. 6 for AoE) and top-P's confidence-entropy regulariser.

Both are written as sums over local tokens divided by the global token count, so that under expert or data
parallelism the per-rank values add up to the single-device loss over the global batch.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

from aoe_ep.config import MoEConfig


def token_entropy(s_TE: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
    """H(softmax(s)) per token (Eq. 8's Ent_conf before the mean), via log_softmax so that p = 0 is harmless."""
    return -(probs_TE * torch.log_softmax(s_TE, dim=1)).sum(dim=1)


def load_balancing_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, total_tokens: int,
                        coeff: float) -> torch.Tensor:
    """α·n·Σ f_i·P_i with f_i = tokens_per_expert/T (sums to K for top-K) and P_i = mean softmax probability.

    megatron-core's switch loss normalises f_i by K·T; passing topk=1 gives the paper's f_i over T.
    """
    if total_tokens == 0:
        return probs_TE.sum() * 0.0
    return switch_load_balancing_loss_func(
        probs=probs_TE, tokens_per_expert=tokens_per_expert_E.to(probs_TE.dtype), total_num_tokens=total_tokens,
        topk=1, num_experts=probs_TE.shape[1], moe_aux_loss_coeff=coeff)


def aux_loss(cfg: MoEConfig, probs_TE: torch.Tensor, entropy_T: torch.Tensor, tokens_per_expert_E: torch.Tensor,
             total_tokens: int) -> torch.Tensor:
    """The layer's auxiliary loss for its selection strategy; expert choice needs none (Zhou et al., 2022)."""
    if cfg.selection == "expert_choice":
        return probs_TE.sum() * 0.0
    loss = load_balancing_loss(probs_TE, tokens_per_expert_E, total_tokens, cfg.aux_loss_coeff)
    if cfg.selection == "top_p":
        loss = loss + cfg.top_p_entropy_coeff * entropy_T.sum() / max(total_tokens, 1)
    return loss
