"""Activation bytes of one micro-batch on one rank: what autograd saves for backward, per layer kind.

Each term names the tensor the layer's backward keeps (held against `torch.autograd.graph.saved_tensors_hooks` in
tests/plan). Notation: T = B·S tokens of the micro-batch, d = d_model, H heads of d_h, V vocabulary, n experts
(n_l on this rank), K selected per token, M routed rows that reach this rank's experts, L = d_low, W the expert
width (d_ffn, or d_wide for factorised experts). `c` is the compute dtype's size (4 in fp32, 2 under bf16
autocast); RMSNorm, the residual stream and the cross-entropy stay fp32 (4) either way. Under autocast every matmul
also saves a compute-dtype copy of its weight: those copies are listed as `weight_copies`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aoe_ep.config import Config, MoEConfig
from aoe_ep.moe.grouped import choose_kernel, pad_to, row_stride
from aoe_ep.moe.selection import expert_capacity

FP32 = 4
INDEX = 8  # int64


@dataclass(frozen=True)
class MicroBatch:
    """The shapes one rank's micro-batch gives the layers: B sequences of S tokens, c bytes per compute element,
    whether autocast runs (its weight copies and input casts), and the device type the run uses (which expert
    kernel runs there, and so whether a misaligned hidden width is padded)."""

    batch: int
    seq_len: int
    compute_bytes: int
    autocast: bool
    device: str = "cuda"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def rms_norm_bytes(mb: MicroBatch, d: int) -> int:
    """nn.RMSNorm (composite): its input x and x·rstd [T, d] and rstd [T], all fp32. Its output is saved by the
    matmul that reads it, counted there."""
    return 2 * mb.tokens * d * FP32 + mb.tokens * FP32


def attention_bytes(cfg: Config, mb: MicroBatch) -> int:
    """QKV projection input [T, d] and output [T, 3d]; RoPE-rotated q and k [T, d] each and the RoPE cos/sin tables;
    SDPA's output [T, d] (the output projection reads it in place) and log-sum-exp [B, H, S] (fp32)."""
    m, t, c = cfg.model, mb.tokens, mb.compute_bytes
    d_head = m.d_model // m.n_heads
    # fp32: the layer's own cos/sin buffers (max_seq_len rows, shared by q and k); autocast: a cast of the first S
    # rows for q and another for k.
    rope = 4 * mb.seq_len * d_head * c if mb.autocast else 2 * m.max_seq_len * d_head * FP32
    return t * m.d_model * c * (1 + 3 + 2 + 1) + mb.batch * m.n_heads * mb.seq_len * FP32 + rope


def dense_ffn_bytes(mb: MicroBatch, d: int, d_ffn: int) -> int:
    """SwiGLU: its input (one cast per matmul under autocast), x·Wg (SiLU's input), SiLU's output, x·Wp, and their
    product (Wo's input), each [T, d_ffn]."""
    inputs = 2 if mb.autocast else 1
    return inputs * mb.tokens * d * mb.compute_bytes + 4 * mb.tokens * d_ffn * mb.compute_bytes


def aoe_cache_kept(cfg: MoEConfig) -> str:
    """Which part of AoE's low-rank cache [T, n, d_low] the scorer keeps for backward (`moe.aoe_cache`):

    - "selected": only the selected rows (with the `softmax_topk` gate and neither aux loss nor top-P entropy an
                  unselected expert gets no gradient): the scorer keeps the rows' tokens [M, d], which the experts
                  share, and the gathered cache rows [M, d_low], which every case keeps for the experts;
    - "full":     `keep`, the whole cache;
    - "none":     `recompute`, nothing: the cache is recomputed from the layer input in backward.
    """
    if not cfg.unselected_get_gradient:
        return "selected"
    return "full" if cfg.aoe_cache == "keep" else "none"


def aoe_cache_bytes(kept: str, tokens: int, num_experts: int, d_low: int, c: int) -> int:
    """Bytes of the scorer's kept cache [T, n, d_low] for each case of `aoe_cache_kept` (the selected rows are
    counted with the experts' inputs)."""
    return tokens * num_experts * d_low * c if kept == "full" else 0


def routed_rows(cfg: MoEConfig, tokens: int) -> float:
    """(token, expert) rows the EP group's T tokens produce: T·K under top-K (top-P is reported at K), n·C under
    expert choice, T·density·n under threshold selection (at its target density)."""
    if cfg.selection == "expert_choice":
        return cfg.num_experts * expert_capacity(tokens, cfg.num_experts, cfg.capacity_factor)
    return tokens * cfg.experts_per_token


def expert_width(cfg: MoEConfig, c: int, device: str = "cuda", rows_per_expert: float = 0.0) -> int:
    """The experts' hidden width as their kernel stores it: the grouped kernel pads it to 16-byte strides (6470 ->
    6472 in bf16); the loop kernel (CPU's choice for large groups) writes its rows 64 bytes apart (`row_stride`)."""
    dtype = torch.bfloat16 if c == 2 else torch.float32
    gate_in = cfg.d_low if cfg.factorized else cfg.d_model
    kernel = choose_kernel(
        cfg.expert_kernel, torch.device(device), dtype, widths=(cfg.d_model, gate_in), rows_per_group=rows_per_expert
    )
    return pad_to(cfg.expert_width, dtype) if kernel == "grouped" else row_stride(cfg.expert_width, dtype)


def _scored_sizes(cfg: MoEConfig, num_local: int) -> int:
    """Experts the scorer computes a cache for: AoE under `allgather` with EP > 1 scores only its own."""
    return (
        num_local
        if (cfg.scorer == "aoe" and cfg.dispatcher == "allgather" and num_local < cfg.num_experts)
        else cfg.num_experts
    )


def moe_layer_bytes(
    cfg: MoEConfig,
    mb: MicroBatch,
    num_local: int,
    scored_tokens: int,
    rows: float,
    returned: tuple[float, float] = (0.0, 0.0),
) -> dict[str, float]:
    """One MoE layer, by part. `scored_tokens`: the tokens this rank scores (its own, or the EP group's under
    `allgather`); `rows`: the routed rows M reaching this rank's experts; `num_local`: the experts it holds (the
    scorer's Wdown is sharded like them under `allgather`); `returned`: under `allgather` with EP > 1, the summed
    rows this rank sends back (gathered tokens with a winner here) and receives (its own tokens, from every rank).

    - input: the layer input [T, d] fp32 (the non-finite count reads it), plus its compute-dtype copy [T, d] (or
      the all-gathered tokens under `allgather`) where the scorer keeps it: a router, AoE with the full or
      recomputed cache;
    - scorer: AoE's kept cache (see `aoe_cache_kept`) and its gathered cache rows [M, L];
    - selection (fp32 whatever the activation dtype): softmax probabilities, exp of the masked scores and
      log-softmax [T, n], the boolean mask [T, n], two per-token sums [T], the aux loss's counts [n];
    - experts: their rows' tokens [M, d], a routed MoE's factorised experts their own cache rows [M, L]; the
      routing indices [M] (int64; AoE's cache rows add the expert index);
    - expert_hidden: the experts' two pre-activations [M, W] (SiLU and the product are recomputed in backward;
      selective activation checkpointing recomputes these too);
    - combine (fp32): the rows' token index [M], gate values [M] and the expert outputs [M, d] (the gates'
      gradient reads them; the sum over a token's rows keeps only its index); `allgather` adds the indices of the
      rows it returns and receives (int64).
    """
    t, c, d, n, autocast = scored_tokens, mb.compute_bytes, cfg.d_model, cfg.num_experts, mb.autocast
    aoe = cfg.scorer == "aoe"
    kept = aoe_cache_kept(cfg) if aoe else None
    gathered = t > mb.tokens  # `allgather`: the scorer reads a new [EP·T, d] tensor
    keeps_input = cfg.scorer == "router" or kept in ("full", "none")
    out = {"input": mb.tokens * d * FP32 + (t * d * c if keeps_input and (autocast or gathered) else 0)}
    out["scorer"] = (
        aoe_cache_bytes(kept, t, _scored_sizes(cfg, num_local), cfg.d_low, c) + rows * cfg.d_low * c if aoe else 0
    )
    balance = n * FP32 if cfg.selection != "expert_choice" else 0
    out["selection"] = 3 * t * n * FP32 + t * n + 2 * t * FP32 + balance
    own_cache = rows * cfg.d_low * c if cfg.factorized and not aoe else 0
    width = expert_width(cfg, c, mb.device, rows / max(num_local, 1))
    out["experts"] = rows * d * c + own_cache + rows * INDEX * (2 if aoe else 1)
    out["expert_hidden"] = 2 * rows * width * c
    sent, received = returned
    out["combine"] = rows * INDEX + rows * FP32 + rows * d * FP32 + (sent + received) * INDEX
    return out


def moe_weight_copy_bytes(
    cfg: MoEConfig, num_local: int, c: int, autocast: bool, device: str = "cuda", rows: float = 0.0
) -> int:
    """Parameter-derived tensors one MoE layer saves: under autocast the compute-dtype casts of the router, of
    AoE's Wdown and of every local expert's matrices (padded to the grouped kernel's width); in fp32 only padded
    expert matrices are copies."""
    d, w, w_run = cfg.d_model, cfg.expert_width, expert_width(cfg, c, device, rows / max(num_local, 1))
    first = cfg.d_low if cfg.factorized else d  # the gate projection reads the cache (factorised) or x
    experts = num_local * (first * w_run + 2 * d * w_run)
    if not autocast:
        return experts * c if w_run != w else 0
    out = experts
    if cfg.factorized and cfg.scorer != "aoe":
        out += num_local * d * cfg.d_low
    if cfg.scorer == "aoe":
        out += _scored_sizes(cfg, num_local) * d * cfg.d_low
    if cfg.scorer == "router":
        out += cfg.num_experts * (cfg.router_hidden or d) + d * cfg.router_hidden
    return out * c


def logits_bytes(cfg: Config, mb: MicroBatch) -> int:
    """The output head's input [T, d] (its cast under autocast), the fp32 log-softmax [T, V], labels [T] (int64),
    the loss mask [T] and two scalars."""
    t = mb.tokens
    return t * cfg.model.d_model * mb.compute_bytes + t * cfg.model.vocab_size * FP32 + t * INDEX + t * FP32 + 2 * FP32


def activation_bytes(
    cfg: Config, mb: MicroBatch, ep: int, expert_rows: float, returned: tuple[float, float] = (0.0, 0.0)
) -> dict[str, float]:
    """Saved bytes of one micro-batch, by layer kind (the MoE layer by part, `moe.<part>`), summed over the layers.
    `expert_rows` and `returned`: the
    routed rows that reach this rank's experts in one MoE layer and the `allgather` combine's rows (see
    `moe_layer_bytes`)."""
    m = cfg.model
    out = {
        "embedding": float(mb.tokens * INDEX),
        "norms": float((2 * m.n_layers + 1) * rms_norm_bytes(mb, m.d_model)),
        "attention": float(m.n_layers * attention_bytes(cfg, mb)),
    }
    copies = 0.0
    if mb.autocast:
        # the attention projections (4d²) of every layer and the output head, cast once per forward
        copies += (m.n_layers * 4 * m.d_model + m.vocab_size) * m.d_model * mb.compute_bytes
    if m.ffn == "moe":
        moe = cfg.moe
        num_local = moe.num_experts // ep
        scored = mb.tokens * ep if (moe.dispatcher == "allgather" and ep > 1) else mb.tokens
        parts = moe_layer_bytes(moe, mb, num_local, scored, expert_rows, returned)
        out.update({f"moe.{part}": float(m.n_layers * v) for part, v in parts.items()})
        copies += m.n_layers * moe_weight_copy_bytes(
            moe, num_local, mb.compute_bytes, mb.autocast, mb.device, expert_rows
        )
    else:
        out["dense_ffn"] = float(m.n_layers * dense_ffn_bytes(mb, m.d_model, m.d_ffn))
        if mb.autocast:
            copies += m.n_layers * 3 * m.d_model * m.d_ffn * mb.compute_bytes
    out["logits"] = float(logits_bytes(cfg, mb))
    out["weight_copies"] = float(copies)
    return out
