"""Activation checkpointing in the plan: what each mode keeps of one micro-batch, and what it recomputes.

`checkpointed_bytes` turns the saved bytes of `activation_bytes` (no checkpointing) into those of a mode, for the
k = ceil(L / every) checkpointed blocks of L (aoe_ep/train/activation_checkpoint.py):

- full: a checkpointed block keeps only its input [T, d] (fp32, the residual stream); its norms, attention, FFN and
  their weight casts go. In backward one block at a time is rebuilt: its saved bytes are transient.
- selective: each RMSNorm keeps its input [T, d] (fp32) instead of x, x·rstd and rstd; attention keeps its input
  (the norm's output, fp32), the QKV projection [T, 3d] and the SDPA output [T, d] (compute dtype) and log-sum-exp
  [B, H, S], and recomputes RoPE's q and k and its weight casts; a dense SwiGLU keeps its input (fp32) and x·Wg and
  x·Wp [T, d_ffn] (compute dtype), and recomputes its weight casts. An MoE layer's experts keep their rows, which
  they keep anyway, and recompute their two pre-activations [M, W] (`moe.expert_hidden`) in backward, one layer at
  a time (transient, like full's rebuilt block); the rest of the layer (scorer, selection, the dispatched rows, the
  expert outputs the gates' gradient reads) is kept, so that no collective runs again.

`recompute_flops`: full runs each checkpointed block's forward again (a third of its training FLOPs); selective
runs the experts' gate and up products again (2·W·(d + d_gate) per routed row, d_gate = d_low for factorised
experts, else d) and charges its element-wise recompute as memory traffic.
"""

from __future__ import annotations

import math

from aoe_ep.config import AC_MODES, Config
from aoe_ep.plan.activations import FP32, MicroBatch, attention_bytes, dense_ffn_bytes, rms_norm_bytes
from aoe_ep.plan.flops import TRAIN_FORWARDS, expert_row_flops


def checkpointed_blocks(n_layers: int, every: int) -> int:
    """Blocks 0, every, 2·every, ... of n_layers."""
    return math.ceil(n_layers / every)


def _block_weight_copies(cfg: Config, mb: MicroBatch) -> float:
    """Weight casts one block's attention and dense FFN keep under autocast."""
    if not mb.autocast:
        return 0.0
    m = cfg.model
    dense = 3 * m.d_model * m.d_ffn if m.ffn == "dense" else 0
    return float((4 * m.d_model * m.d_model + dense) * mb.compute_bytes)


def checkpointed_bytes(cfg: Config, mb: MicroBatch, acts: dict, mode: str, every: int = 1) -> dict[str, float]:
    """The saved bytes of one micro-batch under `mode`, by kind, from `acts` (`activation_bytes`: no checkpointing).
    Kinds as there, plus `checkpoint_inputs` (full)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return dict(acts)
    m, t, c = cfg.model, mb.tokens, mb.compute_bytes
    layers, k = m.n_layers, checkpointed_blocks(m.n_layers, every)
    out = dict(acts)
    norm, attn = rms_norm_bytes(mb, m.d_model), attention_bytes(cfg, mb)
    copies = _block_weight_copies(cfg, mb)
    if mode == "full":
        out["norms"] -= 2 * k * norm
        out["attention"] -= k * attn
        for kind in [kind for kind in out if kind.startswith("moe.")]:
            out[kind] *= (layers - k) / layers
        if "dense_ffn" in out:
            out["dense_ffn"] -= k * dense_ffn_bytes(mb, m.d_model, m.d_ffn)
        moe_copies = acts["weight_copies"] - layers * copies - (m.vocab_size * m.d_model * c if mb.autocast else 0)
        out["weight_copies"] -= k * copies + moe_copies * k / layers
        out["checkpoint_inputs"] = float(k * t * m.d_model * FP32)
        return out
    out["norms"] -= k * (2 * norm - 2 * t * m.d_model * FP32)
    kept_attention = t * m.d_model * (FP32 + 4 * c) + mb.batch * m.n_heads * mb.seq_len * FP32
    out["attention"] -= k * (attn - kept_attention)
    if "dense_ffn" in out:
        kept_ffn = t * m.d_model * FP32 + 2 * t * m.d_ffn * c
        out["dense_ffn"] -= k * (dense_ffn_bytes(mb, m.d_model, m.d_ffn) - kept_ffn)
    out["weight_copies"] -= k * copies
    if "moe.expert_hidden" in out:
        out["moe.expert_hidden"] *= (layers - k) / layers
    return out


def rebuilt_block_bytes(cfg: Config, acts: dict, mode: str) -> float:
    """Bytes a backward rebuilds at once: under full one block's saved activations, under selective one MoE layer's
    expert pre-activations (0 without checkpointing)."""
    if mode == "selective":
        return acts.get("moe.expert_hidden", 0.0) / cfg.model.n_layers
    if mode != "full":
        return 0.0
    per_block = sum(v for kind, v in acts.items() if kind not in ("embedding", "logits", "norms", "weight_copies"))
    return per_block / cfg.model.n_layers + 2 * (acts["norms"] / (2 * cfg.model.n_layers + 1))


def recompute_flops(cfg: Config, flops: dict, mode: str, every: int = 1) -> float:
    """Extra FLOPs per step that `mode` adds to `flops` (`step_flops`, three forwards each)."""
    if mode not in ("full", "selective"):
        return 0.0
    share = checkpointed_blocks(cfg.model.n_layers, every) / cfg.model.n_layers
    if mode == "selective":
        if "experts" not in flops:
            return 0.0
        moe = cfg.moe
        gate_in = moe.d_low if moe.factorized else moe.d_model
        again = 2.0 * moe.expert_width * (gate_in + moe.d_model) / expert_row_flops(moe)
        return share * again * flops["experts"] / TRAIN_FORWARDS
    blocks = sum(v for kind, v in flops.items() if kind != "head")
    return share * blocks / TRAIN_FORWARDS


def recompute_traffic_bytes(none: dict, kept: dict, mode: str) -> float:
    """Memory traffic of selective's element-wise recompute: each tensor it does not keep is read once and
    written once more in backward."""
    if mode != "selective":
        return 0.0
    return 2.0 * max(sum(none.values()) - sum(kept.values()), 0.0)
