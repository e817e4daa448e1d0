"""The MoE layer written the obvious way, one token at a time: read this before `MoELayer`, which must equal it.

Every formula is here once, in the order of the AoE paper (Lv et al., ICML 2025), with Self-Routing's parameter-free
logits, top-P (Huang et al., 2024), expert choice (Zhou et al., 2022), the expert-router coupling loss (ERC, arXiv
2512.23447) and threshold selection (Routing-Free MoE, arXiv 2604.00801). It shares no code with the fast path:
Python loops over tokens and experts, elementary torch ops (so that autograd gives the reference gradients), Python
sorts for the discrete choices. Notation: T tokens, d = d_model, n experts, K = top_k; x is a row vector, x @ W.

Parameters are read from a dict by the layer's state-dict names, so `forward(cfg, dict(layer.named_parameters()),
x)` uses the layer's own weights: `scorer.weight [n, d]` (router; `scorer.w_hidden [d, h]` for the large router),
`scorer.w_down [n, d, d_low]` (AoE), `experts.w_gate / w_p [n, d, D]`, `experts.w_o [n, D, d]`, factorised experts
`experts.w_up [n, d_low, D]` (and their own `experts.w_down` under a router), `threshold_bias [n]` (threshold).

Ties: every ranking sorts by (−value, index), so the lower expert index wins (expert choice: the lower token index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aoe_ep.config import MoEConfig


@dataclass
class Reference:
    """y (shape of x); aux_loss (0-dim, every term the layer adds); stats (the `LoadStats` fields as Python values);
    masks (per token, the set of experts that process it); scores (per token, the n scores s as floats); ranked (per
    token, what the selection ranked: s + b under a balancing bias b, G = relu(s − b) under threshold selection);
    erc_loss (L_ERC before its weight, or None)."""

    y: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict
    masks: list
    scores: list
    ranked: list
    erc_loss: torch.Tensor | None = None


def silu(a: torch.Tensor) -> torch.Tensor:
    return a / (1.0 + torch.exp(-a))


def softmax(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max())
    return e / e.sum()


def norm(c: torch.Tensor, kind: str) -> torch.Tensor:
    """AoE's score of one cache vector: L2 (the paper's choice), L1 or L∞ (its Appendix A)."""
    if kind == "l2":
        return torch.sqrt((c * c).sum())
    return c.abs().sum() if kind == "l1" else c.abs().max()


def ranking(values: list) -> list:
    """Indices of `values`, highest first; equal values keep index order (the tie rule)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def score(cfg: MoEConfig, p: dict, x_D: torch.Tensor) -> tuple[torch.Tensor, list | None]:
    """One token's scores s [n], and AoE's cache [C_1 .. C_n] (else None)."""
    n = cfg.num_experts
    if cfg.scorer == "router":  # Algorithm 1: the router's logits x Wr (large router: SiLU(x W_hidden) Wr)
        h_G = silu(x_D @ p["scorer.w_hidden"]) if "scorer.w_hidden" in p else x_D
        return torch.stack([(h_G * p["scorer.weight"][i]).sum() for i in range(n)]), None
    if cfg.scorer == "self_routing":  # Self-Routing: n channels of the hidden state are the logits
        return torch.stack([x_D[cfg.self_routing_offset + i] for i in range(n)]), None
    # AoE (Sec. 3): every expert computes its cache C_i = x Wdown_i and rates itself by ‖C_i‖
    cache = [x_D @ p["scorer.w_down"][i] for i in range(n)]
    return torch.stack([norm(c_R, cfg.norm) for c_R in cache]), cache


def expert(cfg: MoEConfig, p: dict, i: int, x_D: torch.Tensor, cache: list | None) -> torch.Tensor:
    """E_i(x) = (SiLU(x Wg_i) ⊙ x Wp_i) Wo_i (Eq. 1); factorised Wg_i = Wdown_i Wup_i, AoE reusing its cache C_i."""
    if cfg.scorer == "aoe" or cfg.expert_kind == "factorized":
        a = (cache[i] if cache is not None else x_D @ p["experts.w_down"][i]) @ p["experts.w_up"][i]
    else:
        a = x_D @ p["experts.w_gate"][i]
    return (silu(a) * (x_D @ p["experts.w_p"][i])) @ p["experts.w_o"][i]


def select(cfg: MoEConfig, ranked: list) -> list:
    """Per token, the set of experts that process it, from the ranked values (floats) of every token."""
    n, T = cfg.num_experts, len(ranked)
    if cfg.selection == "threshold":  # expert i fires when G_i exceeds the threshold: 0 to n experts, no ranking
        return [{i for i in range(n) if ranked[t][i] > cfg.threshold} for t in range(T)]
    if cfg.selection == "top_k":
        return [set(ranking(ranked[t])[: cfg.top_k]) for t in range(T)]
    probs = [[math.exp(v - max(row)) / sum(math.exp(u - max(row)) for u in row) for v in row] for row in ranked]
    masks = [set() for _ in range(T)]
    if cfg.selection == "top_p":  # experts ranked by probability, each kept while the mass before it is below P
        for t in range(T):
            mass = 0.0
            for i in ranking(probs[t]):
                if mass >= cfg.top_p:
                    break
                masks[t].add(i)
                mass += probs[t][i]
        return masks
    # expert choice: expert i takes the C = min(T, ⌈T·capacity_factor/n⌉) tokens of highest probability for it
    capacity = min(T, math.ceil(T * cfg.capacity_factor / n))
    for i in range(n):
        for t in ranking([probs[t][i] for t in range(T)])[:capacity]:
            masks[t].add(i)
    return masks


def erc_loss(cfg: MoEConfig, p: dict, u_nd: torch.Tensor) -> torch.Tensor:
    """L_ERC: router row R_i, perturbed to R̃_i = R_i ⊙ (1 + ε_i u_i) with ε_i = ‖R_i − R_j*‖ / (2‖R_i‖) (j* the
    nearest other row, no gradient), excites its own expert: M[i][j] = ‖R̃_i Wg_j‖,
    (1/n²) Σ_i Σ_{j≠i} relu(M[i][j] − α M[i][i]) + relu(M[j][i] − α M[i][i])."""
    n, R = cfg.num_experts, p["scorer.weight"]
    R0 = R.detach()
    eps = [
        min(float(torch.sqrt(((R0[i] - R0[j]) ** 2).sum())) for j in range(n) if j != i)
        / (2.0 * float(torch.sqrt((R0[i] ** 2).sum())))
        for i in range(n)
    ]
    proxies = [R[i] * (1.0 + eps[i] * u_nd[i].to(R.dtype)) for i in range(n)]
    factorized = cfg.expert_kind == "factorized"  # Wg_j = Wdown_j Wup_j
    w_g = [p["experts.w_down"][j] @ p["experts.w_up"][j] if factorized else p["experts.w_gate"][j] for j in range(n)]
    M = [[torch.sqrt(((proxies[i] @ w_g[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    terms = [
        torch.clamp(M[a][b] - cfg.erc_alpha * M[i][i], min=0.0)
        for i in range(n)
        for j in range(n)
        if j != i
        for a, b in ((i, j), (j, i))
    ]
    return torch.stack(terms).sum() / (n * n)


def forward(
    cfg: MoEConfig,
    p: dict,
    x: torch.Tensor,
    expert_bias: list | None = None,
    threshold_lambda: float = 1.0,
    erc_noise: torch.Tensor | None = None,
) -> Reference:
    """The layer on x [..., d]. `expert_bias` (n floats, `moe.balance: bias`) shifts the scores for the selection
    only; `threshold_lambda` is λ, the weight of threshold selection's balancing loss; `erc_noise` is the ERC's
    u [n, d] in [−1, 1] (given: the ERC loss is added, as by a training layer with `moe.erc_loss_coeff` set)."""
    if x.dim() == 0 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"reference.forward expects x [..., {cfg.d_model}], got shape {tuple(x.shape)}")
    n, d, x_TD = cfg.num_experts, cfg.d_model, x.reshape(-1, cfg.d_model)
    T = x_TD.shape[0]
    scored = [score(cfg, p, x_TD[t]) for t in range(T)]
    s_rows = [s for s, _ in scored]
    p_rows = [softmax(s) for s in s_rows]  # over all n experts: aux loss, Ent_conf, the softmax_all gate
    scores = [s.detach().tolist() for s in s_rows]

    if cfg.selection == "threshold":  # G_i = relu(s_i − b_i), differentiable in s and b
        b_E = p["threshold_bias"]
        g_rows = [torch.stack([torch.clamp(s[i] - b_E[i], min=0.0) for i in range(n)]) for s in s_rows]
        ranked = [g.detach().tolist() for g in g_rows]
    else:
        bias = expert_bias if expert_bias is not None else [0.0] * n
        ranked = [[v + b for v, b in zip(row, bias)] for row in scores]
    masks = select(cfg, ranked)

    ys = []
    for t in range(T):  # y = Σ_{i∈I} g_i · E_i(x)
        chosen = sorted(masks[t])
        if cfg.selection == "threshold":  # the gate is G itself, no softmax
            gates = {i: g_rows[t][i] for i in chosen}
        elif cfg.gate == "softmax_topk":  # softmax over the selected experts' scores
            g = softmax(torch.stack([s_rows[t][i] for i in chosen])) if chosen else []
            gates = dict(zip(chosen, g))
        else:  # the full softmax, not renormalised
            gates = {i: p_rows[t][i] for i in chosen}
        e_rows = [gates[i] * expert(cfg, p, i, x_TD[t], scored[t][1]) for i in chosen]
        ys.append(sum(e_rows, torch.zeros(d, dtype=x.dtype)))
    y = torch.stack(ys).reshape(x.shape) if T else x * 0.0

    counts = [sum(i in m for m in masks) for i in range(n)]
    aux = torch.zeros((), dtype=x.dtype)
    if cfg.selection == "threshold" and cfg.balance == "aux" and T:
        # L_LB = μ·L_EB + (1 − μ)·L_TB, L_EB = (1/n) Σ_i mean_t(f_ti)·mean_t(G_ti), L_TB = mean_t[mean_i(f_ti)·
        # mean_j(G_tj)], f the 0/1 firing (a constant); weighted by λ
        l_eb = sum((counts[i] / T) * (sum(g[i] for g in g_rows) / T) for i in range(n)) / n
        l_tb = sum((len(masks[t]) / n) * (g_rows[t].sum() / n) for t in range(T)) / T
        aux = aux + threshold_lambda * (cfg.threshold_mu * l_eb + (1.0 - cfg.threshold_mu) * l_tb)
    elif cfg.selection in ("top_k", "top_p") and T:
        # Eq. 2 (router) / Eq. 6 (AoE): α·n·Σ f_i·P_i, f_i the share of tokens that selected i, P_i the mean
        # probability; only under `moe.balance: aux`
        alpha = cfg.aux_loss_coeff if cfg.balance == "aux" else 0.0
        aux = aux + alpha * n * sum((counts[i] / T) * (sum(pr[i] for pr in p_rows) / T) for i in range(n))
        if cfg.selection == "top_p":  # the confidence-entropy regulariser: the mean of Eq. 8's per-token entropy
            aux = aux + cfg.top_p_entropy_coeff * sum(-(pr * torch.log(pr)).sum() for pr in p_rows) / T
    erc = erc_loss(cfg, p, erc_noise) if erc_noise is not None else None
    aux = aux if erc is None else aux + cfg.erc_loss_coeff * erc

    # statistics, in Python floats: load normalised to 1, Ent_load (Eq. 7), Ent_conf (Eq. 8) of the unbiased
    # softmax, mean score per expert, and the score margin of the decision (lowest selected minus highest unselected
    # ranked value, over the tokens that have both; expert choice records none)
    total = sum(counts)
    load = [c / total for c in counts] if total else [0.0] * n
    pv = [pr.detach().tolist() for pr in p_rows]
    margins = [
        min(ranked[t][i] for i in masks[t]) - max(ranked[t][i] for i in range(n) if i not in masks[t])
        for t in range(T)
        if cfg.selection != "expert_choice" and 0 < len(masks[t]) < n
    ]
    stats = {
        "tokens_per_expert": counts,
        "load": load,
        "ent_load": -sum(f * math.log(f) for f in load if f > 0),
        "ent_conf": sum(-sum(q * math.log(q) for q in row if q > 0) for row in pv) / T if T else 0.0,
        "max_minus_min": max(load) - min(load),
        "num_tokens": T,
        "score_mean": [sum(row[i] for row in scores) / T if T else 0.0 for i in range(n)],
        "score_margin": sum(margins) / len(margins) if margins else 0.0,
        "margin_tokens": len(margins),
    }
    return Reference(y=y, aux_loss=aux, stats=stats, masks=masks, scores=scores, ranked=ranked, erc_loss=erc)
