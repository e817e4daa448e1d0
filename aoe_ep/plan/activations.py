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

from aoe_ep.config import Config, MoEConfig
from aoe_ep.moe.selection import expert_capacity

FP32 = 4
INDEX = 8  # int64


@dataclass(frozen=True)
class MicroBatch:
    """The shapes one rank's micro-batch gives the layers: B sequences of S tokens, c bytes per compute element,
    and whether autocast runs (its weight copies and input casts)."""

    batch: int
    seq_len: int
    compute_bytes: int
    autocast: bool

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
    """Which part of AoE's low-rank cache [T, n, d_low] the scorer keeps for backward (issue 15):

    - "full":     all of it (the norm's backward; today's layer always does this);
    - "selected": only the selected rows [T·K, d_low] (softmax_topk gate, no aux loss, no top-P entropy: the
                  unselected experts get no gradient);
    - "none":     nothing (`moe.aoe_cache: recompute` recomputes it from the layer input in backward).

    The experts' own copy of the selected rows (the input of C·Wup) is counted with the experts in any case.
    """
    return "full"


def aoe_cache_bytes(kept: str, tokens: int, num_experts: int, top_k: int, d_low: int, c: int) -> int:
    """Bytes of the scorer's kept cache for each case of `aoe_cache_kept`."""
    rows = {"full": tokens * num_experts, "selected": tokens * top_k, "none": 0}[kept]
    return rows * d_low * c


def routed_rows(cfg: MoEConfig, tokens: int) -> float:
    """(token, expert) rows the EP group's T tokens produce: T·K under top-K (top-P is reported at K), n·C under
    expert choice."""
    if cfg.selection == "expert_choice":
        return cfg.num_experts * expert_capacity(tokens, cfg.num_experts, cfg.capacity_factor)
    return tokens * cfg.top_k


def moe_layer_bytes(cfg: MoEConfig, mb: MicroBatch, num_local: int, scored_tokens: int, rows: float,
                    returned: tuple[float, float] = (0.0, 0.0)) -> dict[str, float]:
    """One MoE layer, by part. `scored_tokens`: the tokens this rank scores (its own, or the EP group's under
    `allgather`); `rows`: the routed rows reaching this rank's experts; `num_local`: the experts it holds (the
    scorer's Wdown is sharded like them under `allgather`); `returned`: under `allgather` with EP > 1, the summed
    rows this rank sends back (gathered tokens with a winner here) and receives (its own tokens, from every rank).

    - input: the layer input [T, d] fp32 (the NaN check and the scorer read it), plus the scorer's compute-dtype
      cast under autocast or the all-gathered tokens under `allgather`;
    - scorer: AoE's stacked Wdown reshaped to [d, n·L] (a copy), its cache (see `aoe_cache_kept`) and norms
      [T, n]; a router's weight cast under autocast; Self-Routing nothing;
    - selection: softmax probabilities, exp of the masked scores and log-softmax [T, n], the boolean mask [T, n],
      two per-token sums [T], the aux loss's counts [n]; the routing indices [M] (int64; AoE's cache gather adds
      the expert index [M]);
    - experts: their input rows [M, d] (one cast per matmul under autocast), AoE's gathered cache rows [M, L], four
      [M, W] tensors (the gate matmul output, SiLU's output, the x·Wp output, their product);
    - combine: the transposed mask and gates [n, T] (`allgather`: of the local experts), the routed gate values
      [M] and expert outputs [M, d]; `allgather` adds the indices of the rows it returns and receives (int64) and
      the received rows [R, d].
    """
    t, c, d, n, autocast = scored_tokens, mb.compute_bytes, cfg.d_model, cfg.num_experts, mb.autocast
    n_scored = num_local if (cfg.scorer == "aoe" and cfg.dispatcher == "allgather" and num_local < n) else n
    aoe = cfg.scorer == "aoe"
    gathered = t > mb.tokens  # `allgather`: the scorer reads a new [EP·T, d] tensor
    copy = (autocast and cfg.scorer != "self_routing") or gathered
    out = {"input": mb.tokens * d * FP32 + (t * d * (c if autocast else FP32) if copy else 0)}
    if aoe:
        scorer = aoe_cache_bytes(aoe_cache_kept(cfg), t, n_scored, cfg.top_k, cfg.d_low, c) + t * n_scored * c
    else:
        scorer = 0
    out["scorer"] = scorer
    balance = n * c if cfg.selection != "expert_choice" else 0  # the aux loss's tokens_per_expert cast
    out["selection"] = 3 * t * n * c + t * n + 2 * t * c + balance + rows * INDEX * (2 if aoe else 1)
    casts = 2 if autocast and not aoe else 1  # AoE experts read x once (x·Wp); the others twice
    expert = casts * rows * d * c + 4 * rows * cfg.expert_width * c
    if cfg.factorized:
        expert += rows * cfg.d_low * c
    out["experts"] = expert
    sent, received = returned
    n_combined = num_local if sent or received else n
    out["combine"] = (t * n_combined * (1 + c) + rows * c + rows * d * c
                      + (sent + received) * INDEX + received * d * c)
    return out


def moe_weight_copy_bytes(cfg: MoEConfig, num_local: int, c: int, autocast: bool) -> int:
    """Parameter-derived tensors one MoE layer saves: AoE's reshaped Wdown (a copy in any precision) and, under
    autocast, the compute-dtype casts of the router and of every local expert's matrices."""
    d, n = cfg.d_model, cfg.num_experts
    out = 0
    if cfg.scorer == "aoe":
        n_scored = num_local if (cfg.dispatcher == "allgather" and num_local < n) else n
        out += n_scored * d * cfg.d_low * c
    if autocast:
        if cfg.scorer == "router":
            out += (n * (cfg.router_hidden or d) + d * cfg.router_hidden) * c
        w = cfg.expert_width
        if cfg.factorized:  # Wup, Wp, Wo; a routed MoE's factorised experts hold their own Wdown too
            per_expert = cfg.d_low * w + 2 * d * w + (d * cfg.d_low if cfg.scorer != "aoe" else 0)
        else:
            per_expert = 3 * d * w
        out += num_local * per_expert * c
    return out


def logits_bytes(cfg: Config, mb: MicroBatch) -> int:
    """The output head's input [T, d] (its cast under autocast), the fp32 log-softmax [T, V], labels [T] (int64),
    the loss mask [T] and two scalars."""
    t = mb.tokens
    return t * cfg.model.d_model * mb.compute_bytes + t * cfg.model.vocab_size * FP32 + t * INDEX + t * FP32 + 2 * FP32


def activation_bytes(cfg: Config, mb: MicroBatch, ep: int, expert_rows: float,
                     returned: tuple[float, float] = (0.0, 0.0)) -> dict[str, float]:
    """Saved bytes of one micro-batch, by layer kind (the MoE layer by part, `moe.<part>`), summed over the layers.
    `expert_rows` and `returned`: the
    routed rows that reach this rank's experts in one MoE layer and the `allgather` combine's rows (see
    `moe_layer_bytes`)."""
    m = cfg.model
    out = {"embedding": float(mb.tokens * INDEX),
           "norms": float((2 * m.n_layers + 1) * rms_norm_bytes(mb, m.d_model)),
           "attention": float(m.n_layers * attention_bytes(cfg, mb))}
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
        copies += m.n_layers * moe_weight_copy_bytes(moe, num_local, mb.compute_bytes, mb.autocast)
    else:
        out["dense_ffn"] = float(m.n_layers * dense_ffn_bytes(mb, m.d_model, m.d_ffn))
        if mb.autocast:
            copies += m.n_layers * 3 * m.d_model * m.d_ffn * mb.compute_bytes
    out["logits"] = float(logits_bytes(cfg, mb))
    out["weight_copies"] = float(copies)
    return out
