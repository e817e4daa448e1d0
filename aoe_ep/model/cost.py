"""Cost of the decoder around its FFNs, forward FLOPs per token (a multiply-add counts 2); the FFN's own cost is the
layer cost model's (`aoe_ep.moe.cost`). A training step costs `TRAIN_FORWARDS` forwards (backward ≈ 2× forward); no
recomputation is counted."""

from __future__ import annotations

TRAIN_FORWARDS = 3.0


def attention_flops(d_model: int, seq_len: int) -> float:
    """One attention block per token: QKV and output projections (8d²), causal scores and weighted values (2·S·d:
    4·S·d halved by the mask)."""
    return 8.0 * d_model * d_model + 2.0 * seq_len * d_model


def head_flops(d_model: int, vocab_size: int) -> float:
    """The output head per token (2·d·V)."""
    return 2.0 * d_model * vocab_size
