"""Auxiliary losses: load balancing (Eq. 2 for routers, Eq. 6 for AoE), top-P's confidence-entropy regulariser and
threshold selection's balancing loss (Routing-Free MoE, arXiv 2604.00801).

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


def threshold_balance_loss(cfg: MoEConfig, g_own_TE: torch.Tensor, fired_own_TE: torch.Tensor,
                           sums: BatchSums) -> torch.Tensor:
    """Routing-Free MoE's L_LB = μ·L_EB + (1 − μ)·L_TB before its adaptive weight λ (the layer's `threshold_lambda`):
    L_EB = (1/n) Σ_i mean_x(f_i)·mean_x(G_i) per expert, L_TB = mean_x[mean_i(f_i)·mean_j(G_j)] per token, f the 0/1
    firing (no gradient), G = relu(s − b) differentiable, means over the EP group's batch (`sums.gate_sum`,
    `sums.token_balance_sum`); 0 under `moe.balance: none`."""
    if cfg.balance != "aux" or sums.num_tokens == 0:
        return g_own_TE.sum() * 0.0
    num_tokens, n = sums.num_tokens, g_own_TE.shape[1]
    f_mean_E = sums.tokens_per_expert.to(g_own_TE.dtype) / num_tokens
    g_mean_E = _global_value(g_own_TE.sum(dim=0), sums.gate_sum.to(g_own_TE.dtype)) / num_tokens
    expert_balance = (f_mean_E * g_mean_E).sum() / n
    token_own = (fired_own_TE.to(g_own_TE.dtype).mean(dim=1) * g_own_TE.mean(dim=1)).sum()
    token_balance = _global_value(token_own, sums.token_balance_sum.to(g_own_TE.dtype)) / num_tokens
    return cfg.threshold_mu * expert_balance + (1.0 - cfg.threshold_mu) * token_balance
