"""Selection strategies over any score matrix s_TE (router logits, AoE norms, Self-Routing logits).

Every strategy breaks ties the same way: the lower expert index first (for expert choice, the lower token index),
which is what a stable descending sort gives. `torch.topk` makes no such promise, so it is not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from aoe_ep.config import MoEConfig
from aoe_ep.moe.routing import Decision


@dataclass(frozen=True)
class Selection:
    """mask_TE: which experts process which token; gates_TE: their weights (zero off the mask);
    probs_TE: softmax of the scores over all experts (for the aux loss, Ent_conf and the top-P regulariser)."""

    mask_TE: torch.Tensor
    gates_TE: torch.Tensor
    probs_TE: torch.Tensor


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32 if it is in a 16-bit float type: scores, softmax and selection never run in reduced precision,
    so that it never changes which experts win."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _ranked(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices that sort `values` descending along `dim`, ties kept in index order."""
    return torch.sort(values, dim=dim, descending=True, stable=True).indices


def top_k_order(s_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Token choice: each token's k highest-scoring experts, in rank order [T, k]."""
    return _ranked(s_TE, dim=1)[:, :k]


def top_k_mask(s_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Token choice as a mask: each token's k highest-scoring experts."""
    return torch.zeros_like(s_TE, dtype=torch.bool).scatter_(1, top_k_order(s_TE, k), True)


def top_p_mask(probs_TE: torch.Tensor, p: float) -> torch.Tensor:
    """Top-P token choice (Huang et al., 2024): the smallest prefix of experts, ranked by probability,
    whose mass reaches p; an expert is kept iff the mass ranked before it is still below p."""
    order_TE = _ranked(probs_TE, dim=1)
    sorted_TE = probs_TE.gather(1, order_TE)
    mass_before_TE = torch.cumsum(sorted_TE, dim=1).roll(1, dims=1)
    mass_before_TE[:, 0] = 0.0
    keep_TE = mass_before_TE < p
    return torch.zeros_like(keep_TE).scatter_(1, order_TE, keep_TE)


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Expert choice capacity C = ceil(T·capacity_factor/n), at most T (Zhou et al., 2022)."""
    return min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts))


def expert_choice_order(probs_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Expert choice: each expert's `capacity` tokens of highest probability [C, E] (ties: lower token first)."""
    return _ranked(probs_TE, dim=0)[:capacity]


def expert_choice_mask(probs_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Expert choice as a mask: each expert takes the `capacity` tokens that give it the highest probability."""
    return torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(0, expert_choice_order(probs_TE, capacity), True)


def expert_choice_decision(probs_TE: torch.Tensor, capacity: int) -> Decision:
    """Expert choice as a `Decision` carrying each expert's tokens, so that grouping needs no `nonzero`."""
    order_CE = expert_choice_order(probs_TE, capacity)
    mask_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(0, order_CE, True)
    return Decision(mask_SE=mask_TE, chosen_CE=order_CE)


def gate_weights(s_TE: torch.Tensor, probs_TE: torch.Tensor, mask_TE: torch.Tensor, gate: str) -> torch.Tensor:
    """`softmax_topk`: softmax over each token's selected experts; `softmax_all`: the full softmax, unrenormalised.

    The masked softmax is written out so that a token no expert chose (expert choice) gets zero gates, not NaN.
    """
    if gate == "softmax_all":
        return probs_TE * mask_TE
    neg_inf = float("-inf")
    row_max_T1 = s_TE.detach().masked_fill(~mask_TE, neg_inf).amax(dim=1, keepdim=True)
    row_max_T1 = torch.where(torch.isfinite(row_max_T1), row_max_T1, torch.zeros_like(row_max_T1))
    e_TE = torch.exp((s_TE - row_max_T1).masked_fill(~mask_TE, neg_inf))
    return e_TE / e_TE.sum(dim=1, keepdim=True).clamp_min(torch.finfo(e_TE.dtype).tiny)


def threshold_gates(s_TE: torch.Tensor, threshold_bias_E: torch.Tensor) -> torch.Tensor:
    """Routing-Free MoE's gate G = relu(s − b) for every (token, expert), in at least fp32, differentiable in s and
    b; expert i fires for a token when G_i exceeds `moe.threshold`."""
    s_TE = at_least_fp32(s_TE)
    return torch.relu(s_TE - threshold_bias_E.to(s_TE.dtype))


def decide(
    s_TE: torch.Tensor,
    cfg: MoEConfig,
    expert_choice: Optional[Callable[[torch.Tensor], Decision]] = None,
    bias_E: Optional[torch.Tensor] = None,
    threshold_bias_E: Optional[torch.Tensor] = None,
) -> Decision:
    """Which experts process which token under `cfg.selection`, from the scores s_TE [tokens, all n experts]
    (no gradient: the decision is discrete; scores are ranked in at least fp32).

    Token choice needs only each token's row; expert choice ranks tokens over the whole batch, so a dispatcher whose
    rows are not the whole batch passes `expert_choice`, mapping these rows' probabilities to their decision.
    `bias_E` (`moe.balance: bias`, DeepSeek-V3's balancing bias) is added to the scores for this decision only:
    top-K ranks s + b, top-P the softmax of s + b; gates and losses keep the unbiased scores.
    Threshold selection fires every pair whose `threshold_gates` with `threshold_bias_E` (the layer's learned b)
    exceeds `moe.threshold`: 0 to n experts per token, no ranking.
    """
    with torch.no_grad():
        if cfg.selection == "threshold":
            if threshold_bias_E is None:
                raise ValueError("threshold selection needs the layer's threshold bias b")
            return Decision(mask_SE=threshold_gates(s_TE.detach(), threshold_bias_E.detach()) > cfg.threshold)
        s_TE = at_least_fp32(s_TE.detach())
        if bias_E is not None:
            s_TE = s_TE + bias_E.to(s_TE.dtype)
        if cfg.selection == "top_k":
            order_TK = top_k_order(s_TE, cfg.top_k)
            mask_TE = torch.zeros_like(s_TE, dtype=torch.bool).scatter_(1, order_TK, True)
            return Decision(mask_SE=mask_TE, topk_SK=order_TK)
        probs_TE = torch.softmax(s_TE, dim=1)
        if cfg.selection == "top_p":
            return Decision(mask_SE=top_p_mask(probs_TE, cfg.top_p))
        if expert_choice is not None:
            return expert_choice(probs_TE)
        return expert_choice_decision(probs_TE, expert_capacity(s_TE.shape[0], s_TE.shape[1], cfg.capacity_factor))


def weigh(
    s_TE: torch.Tensor, mask_TE: torch.Tensor, gate: str, threshold_g_TE: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs_TE, gates_TE) in at least fp32 from the differentiable scores: the softmax over all experts, and the
    gates of
    `gate` over the selected ones; under threshold selection (`threshold_g_TE`, the `threshold_gates` of s) the gates
    are G on the fired pairs, unnormalised, and the softmax serves the statistics only."""
    s_TE = at_least_fp32(s_TE)
    probs_TE = torch.softmax(s_TE, dim=1)
    if threshold_g_TE is not None:
        return probs_TE, threshold_g_TE * mask_TE
    return probs_TE, gate_weights(s_TE, probs_TE, mask_TE, gate)


def select(
    s_TE: torch.Tensor, cfg: MoEConfig, expert_choice: Optional[Callable[[torch.Tensor], Decision]] = None
) -> Selection:
    """Apply `cfg.selection` and `cfg.gate` to the score matrix s_TE [tokens, all n experts]: `decide`, then `weigh`."""
    mask_TE = decide(s_TE, cfg, expert_choice).mask_SE
    probs_TE, gates_TE = weigh(s_TE, mask_TE, cfg.gate)
    return Selection(mask_TE=mask_TE, gates_TE=gates_TE, probs_TE=probs_TE)
