"""FLOPs of one training step on one rank, by part (docs/design.md section 3; a multiply-add counts 2, backward ≈ 2×
forward, so a step is three forwards; no recomputation).

Per token and layer: attention's QKV and output projections 8d² and its causal score and value matmuls 2·S·d
(4·S·d halved by the mask); the FFN of the layer cost model (`aoe_ep.moe.cost`), split into the selector, which
every token pays on whichever rank (AoE: 2·n·d·d_low, router: 2·d·n), and the experts, paid per routed row by the
rank that holds the expert; the output head 2·d·V.
"""

from __future__ import annotations

from aoe_ep.config import Config, MoEConfig
from aoe_ep.model.cost import TRAIN_FORWARDS, attention_flops, head_flops
from aoe_ep.moe.cost import dense_flops, moe_flops


def selector_flops(cfg: MoEConfig) -> float:
    """Forward FLOPs per token of the scoring, before any expert runs."""
    if cfg.scorer == "aoe":
        return 2.0 * cfg.num_experts * cfg.d_model * cfg.d_low
    if cfg.scorer == "router":
        return 2.0 * cfg.d_model * cfg.num_experts
    return 0.0


def expert_row_flops(cfg: MoEConfig) -> float:
    """Forward FLOPs of one (token, expert) row in its expert."""
    k = cfg.experts_per_token
    return (moe_flops(cfg) - selector_flops(cfg)) / k


def step_flops(cfg: Config, tokens: float, expert_rows: float) -> dict[str, float]:
    """Training FLOPs of one step on a rank that processes `tokens` of its own and `expert_rows` routed rows in
    each MoE layer (summed over the step's micro-batches)."""
    m = cfg.model
    seq = cfg.data.seq_len
    out = {"attention": m.n_layers * attention_flops(m.d_model, seq) * tokens}
    if m.ffn == "moe":
        out["selector"] = m.n_layers * selector_flops(cfg.moe) * tokens
        out["experts"] = m.n_layers * expert_row_flops(cfg.moe) * expert_rows
    else:
        out["dense_ffn"] = m.n_layers * dense_flops(m.d_model, m.d_ffn) * tokens
    out["head"] = head_flops(m.d_model, m.vocab_size) * tokens
    return {k: TRAIN_FORWARDS * v for k, v in out.items()}
