"""Cost model of one FFN layer (docs/design.md section 3): forward FLOPs per token, a multiply-add counting 2.

Backward is about twice the forward, so forward+backward ratios equal forward ratios; benchmarks print their
measured throughput ratios next to the bounds these give.
"""

from __future__ import annotations

from aoe_ep.config import MoEConfig


def dense_flops(d_model: int, d_ffn: int) -> float:
    """Dense SwiGLU: three d×d_ffn matmuls."""
    return 6.0 * d_model * d_ffn


def moe_flops(cfg: MoEConfig) -> float:
    """Forward FLOPs per token of `cfg`'s layer with top-K selection (top-P and expert choice average to it; threshold
    selection at its target density)."""
    d, n, k = cfg.d_model, cfg.num_experts, cfg.experts_per_token
    if cfg.scorer == "aoe":
        return 2.0 * n * d * cfg.d_low + k * (2.0 * cfg.d_low * cfg.d_wide + 4.0 * d * cfg.d_wide)
    router = 2.0 * d * n if cfg.scorer == "router" else 0.0
    return router + k * dense_flops(d, cfg.d_ffn)


def erc_flops(cfg: MoEConfig) -> float:
    """Forward FLOPs per step of the ERC loss (Lv et al.): the n proxies through every expert's gate projection,
    2·n²·d·D (factorised experts: 2·n²·(d·d_low + d_low·d_wide)); independent of the token count."""
    if cfg.erc_loss_coeff == 0:
        return 0.0
    n, d = cfg.num_experts, cfg.d_model
    per_pair = d * cfg.d_low + cfg.d_low * cfg.d_wide if cfg.factorized else d * cfg.d_ffn
    return 2.0 * n * n * per_pair
