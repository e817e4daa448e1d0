"""Auxiliary losses: load balancing (Eq. 2 for routers, Eq. 6 for AoE), top-P's confidence-entropy regulariser,
threshold selection's balancing loss (Routing-Free MoE, arXiv 2604.00801) and the expert-router coupling (ERC)
loss of a learned router (arXiv 2512.23447).

The first two are written as sums over local tokens divided by the global token count, so that under expert or data
parallelism the per-rank values add up to the single-device loss over the global batch.
"""

from __future__ import annotations

import aoe_ep.megatron_core  # noqa: F401  (first: megatron-core without its TE / apex start-up warnings)

# isort: split
import torch
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

from aoe_ep.config import MoEConfig
from aoe_ep.moe.selection import at_least_fp32
from aoe_ep.moe.stats import BatchSums


def token_entropy(s_TE: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
    """H(softmax(s)) per token (Eq. 8's Ent_conf before the mean), via log_softmax so that p = 0 is harmless."""
    return -(probs_TE * torch.log_softmax(s_TE, dim=1)).sum(dim=1)


def _global_value(own: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The global value `total`, differentiable through this rank's part `own` only: summed over ranks, the
    gradients equal those of the single-device loss, and every rank reports the same number."""
    return own + (total - own).detach()


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x with its value unchanged and its gradient multiplied by `factor` (as `factor · x` would have it). A layer's
    aux loss takes this form, with the EP size, when the caller averages every rank's gradients over the data-
    parallel world: its gradient flows through the rank's own tokens only, so the EP group's ranks together carry
    one single-device gradient, which the world-wide mean would otherwise divide by the EP size."""
    return _ScaleGradient.apply(x, factor)


def load_balancing_loss(probs_own_TE: torch.Tensor, sums: BatchSums, coeff: float) -> torch.Tensor:
    """α·n·Σ f_i·P_i with f_i = tokens_per_expert/T (sums to K for top-K) and P_i = mean softmax probability.

    megatron-core's switch loss normalises f_i by K·T; passing topk=1 gives the paper's f_i over T. It sums its
    `probs` over rows, so it gets the one row of global probability sums.
    """
    if sums.num_tokens == 0:
        return probs_own_TE.sum() * 0.0
    probs_sum_1E = _global_value(probs_own_TE.sum(dim=0), sums.probs_sum.to(probs_own_TE.dtype)).unsqueeze(0)
    return switch_load_balancing_loss_func(
        probs=probs_sum_1E,
        tokens_per_expert=sums.tokens_per_expert.to(probs_own_TE.dtype),
        total_num_tokens=sums.num_tokens,
        topk=1,
        num_experts=probs_own_TE.shape[1],
        moe_aux_loss_coeff=coeff,
    )


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


# The expert-router coupling loss (ERC; Lv et al., arXiv 2512.23447, Sec. 3). Router rows R[i] act as proxy tokens of
# expert i; M[i, j] = ‖R̃[i] W_g^j‖ is how strongly expert j's gate projection answers proxy i. The pieces below are
# what the layer runs under expert parallelism too: each rank computes the columns of its own experts
# (`erc_gate_norms`) and the dispatcher gathers them (`expert_columns`) before `erc_from_norms`.


def erc_noise(num_experts: int, d_model: int, seed: int, layer: int, step: int) -> torch.Tensor:
    """u ~ U(−1, 1)^[n, d] for one layer and training step, from a CPU generator seeded by (run seed, layer, step)
    only: the same on every rank, device and EP layout, and after a resume (the step is in the checkpoint)."""
    mixed = ((int(seed) * 1_000_003 + int(layer)) * 1_000_000_007 + int(step)) % (2**63)
    g = torch.Generator(device="cpu").manual_seed(mixed)
    return torch.rand(num_experts, d_model, generator=g, dtype=torch.float32) * 2.0 - 1.0


def erc_eps(router_nd: torch.Tensor) -> torch.Tensor:
    """ε_i = ‖R[i] − R[j*]‖ / (2‖R[i]‖), j* the nearest other row: the largest noise that keeps proxy i nearer to
    R[i] than to any other row. No gradient (recomputed every step)."""
    with torch.no_grad():
        r = router_nd.detach().double()
        dist_nn = torch.cdist(r, r).fill_diagonal_(float("inf"))
        eps_n = dist_nn.min(dim=1).values / (2.0 * torch.linalg.vector_norm(r, dim=1))
    return eps_n.to(at_least_fp32(router_nd).dtype)


def erc_proxies(router_nd: torch.Tensor, eps_n: torch.Tensor, u_nd: torch.Tensor) -> torch.Tensor:
    """R̃[i] = R[i] ⊙ (1 + ε_i·u_i): differentiable in R only (the multiplicative noise is a constant)."""
    delta_nd = (1.0 + eps_n.detach().unsqueeze(1) * u_nd.detach().to(eps_n.dtype)).to(router_nd.dtype)
    return router_nd * delta_nd


def erc_gate_norms(proxies_nd: torch.Tensor, w_gate) -> torch.Tensor:
    """M[:, j] = ‖R̃ W_g^j‖₂ for the experts j of `w_gate`: [n, X] for X experts. `w_gate` is the SwiGLU gate
    projection [X, d, D], or the pair (W_down [X, d, r], W_up [X, r, D]) of factorised experts, applied as two
    products so that W_g = W_down·W_up is never formed."""
    # bmm over the proxies expanded (a view) along the experts: torch.matmul's broadcasting would copy W_g
    # ([X, d, D], as large as the experts' gate weights) and keep the copy for backward.
    factors = tuple(w_gate) if isinstance(w_gate, (tuple, list)) else (w_gate,)
    a_XnD = proxies_nd.unsqueeze(0).expand(factors[0].shape[0], -1, -1)
    for w_XkN in factors:
        a_XnD = torch.bmm(a_XnD, w_XkN.to(a_XnD.dtype))
    return torch.linalg.vector_norm(at_least_fp32(a_XnD), dim=2).t().contiguous()


def erc_from_norms(m_nn: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_ERC = (1/n²) Σ_i Σ_{j≠i} [relu(M[i,j] − α·M[i,i]) + relu(M[j,i] − α·M[i,i])]: expert i answers its own
    proxy more strongly than any other expert does, and its proxy excites it more than other proxies do."""
    n = m_nn.shape[0]
    own_n1 = alpha * m_nn.diagonal().unsqueeze(1)
    off_nn = ~torch.eye(n, dtype=torch.bool, device=m_nn.device)
    terms_nn = torch.relu(m_nn - own_n1) + torch.relu(m_nn.t() - own_n1)
    return (terms_nn * off_nn).sum() / (n * n)


def erc_loss(
    router_nd: torch.Tensor, w_gate_ndD, alpha: float, u_nd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_ERC, ε [n]) on one device: router rows R [n, d], every expert's gate projection W_g [n, d, D] (the input of
    SiLU), α, and the noise u [n, d] in [−1, 1]. Factorised experts pass the pair (W_down [n, d, r], W_up [n, r, D])
    as `w_gate_ndD` (see `erc_gate_norms`). Gradients reach R and every W_g^j; none flows through ε or u."""
    eps_n = erc_eps(router_nd)
    m_nn = erc_gate_norms(erc_proxies(router_nd, eps_n, u_nd), w_gate_ndD)
    return erc_from_norms(m_nn, alpha), eps_n


def threshold_balance_loss(
    cfg: MoEConfig, g_own_TE: torch.Tensor, fired_own_TE: torch.Tensor, sums: BatchSums
) -> torch.Tensor:
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
