"""Communication model: the bytes each rank sends in one EP layer, forward and backward (docs/design.md section 2).

Notation: T_r tokens on rank r, T = Σ T_r over the EP group, d = d_model, L = d_low, n experts, n_l = n/EP local
experts, b bytes per element, 8 bytes per int64 count. "Sent" excludes what a rank keeps for itself.

allgather (forward; backward mirrors each term with the reverse collective):
  sizes    (EP−1)·16                            row count and non-finite input count, before the uneven all-gather
  tokens   (EP−1)·T_r·d·b                       all-gather of x;        backward: reduce-scatter (T − T_r)·d·b
  norms    (EP−1)·n_l·T·b   (AoE only)          all-gather of ||C_i||;  backward: the same amount
  counts   (EP−1)·8                             combined rows per destination rank
  combine  Σ_{q≠r} A_rq·d·b                     A_rq = tokens of rank q with ≥1 winner among r's experts
                                                 backward: Σ_{q≠r} A_qr·d·b
alltoall (both routes):
  sizes    (EP−1)·16
  stats    (EP−1)·(3n+3)·8                      one all-reduce of counts, Σp, Σs, Σ entropy, Σ margin and its
                                                 token count (float64); threshold selection adds n + 1: Σ G_i
                                                 and its loss's token-balance sum
  probs    (EP−1)·T_r·n·b   (expert choice)     all-gather of the softmax for the global ranking
alltoall, combine "rank" (the default: a token row once per (token, rank), its expert outputs summed there):
  counts   (EP−1)·8                             token rows per destination rank
  dispatch Σ_{q≠r} U_rq·(d + ⌈n_l/8⌉)·b         U_rq = tokens of r with ≥1 winner among q's experts; each row
                                                 carries its expert flags, 8 to a column (`expert_columns`)
                                                 backward: Σ_{q≠r} U_qr·d·b
  cache    Σ_{q≠r} W_rq·L·b   (AoE only)        W_rq = winning (token of r, expert of q) pairs: the cache row of
                                                 each pair;  backward: Σ_{q≠r} W_qr·L·b
  gates    Σ_{q≠r} W_rq·g                       the gate of each pair, g = max(4, b) bytes (gates are at least
                                                 fp32);  backward: Σ_{q≠r} W_qr·g
  combine  Σ_{q≠r} U_qr·d·b                     one gated sum per (token, rank);  backward: Σ_{q≠r} U_rq·d·b
alltoall, combine "pair" (one row per (token, expert) pair, summed on the token's rank):
  counts   (EP−1)·n_l·8                         rows per (rank, local expert)
  dispatch Σ_{q≠r} W_rq·(d + L_c)·b             L_c = L when the rows carry the AoE cache, else 0
                                                 backward: Σ_{q≠r} W_qr·(d+L_c)·b
  combine  Σ_{q≠r} W_qr·d·b                     backward: Σ_{q≠r} W_rq·d·b
both, with the ERC loss:
  erc      (EP−1)·n_l·n·4                       all-gather of this rank's columns of M (n × n_l, fp32 like every
                                                 score, whatever the compute dtype); no backward
                                                 (every rank differentiates the same loss: `all_gather_shared`)

The data-dependent terms (A, U, W) come from the routing mask, its columns in placed order (rank 0's experts first);
under uniform routing with K experts per token their expectations are W_rq = T_r·K/EP, A_rq = T_q·p and
U_rq = T_r·p with p = 1 − C(n−n_l, K)/C(n, K), the chance that a token picks one of a given rank's experts (a token
reaches EP·p distinct ranks), which `expected_bytes_per_token` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Optional

import torch

COMBINES = ("rank", "pair")  # the `alltoall` dispatcher's routes: per (token, rank), per (token, expert) pair
EXPERT_BITS = 8  # expert flags per column of a dispatched row: integers below 2^8 are exact in bf16 and wider


def expert_columns(n_local: int) -> int:
    """Columns that carry a dispatched token row's flags for the n_local experts of its destination rank."""
    return -(-n_local // EXPERT_BITS)


def _pairs(mask_TE: torch.Tensor, sizes: Sequence[int], ep: int) -> torch.Tensor:
    """W[r, q]: winning (token of rank r, expert of rank q) pairs."""
    owner_T = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))
    per_rank_TQ = mask_TE.view(mask_TE.shape[0], ep, -1).sum(dim=2)
    return torch.stack([per_rank_TQ[owner_T == r].sum(dim=0) for r in range(len(sizes))])


def _any_pairs(mask_TE: torch.Tensor, sizes: Sequence[int], ep: int) -> torch.Tensor:
    """A[r, q]: tokens of rank q with at least one winner among rank r's experts."""
    owner_T = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))
    any_TR = mask_TE.view(mask_TE.shape[0], ep, -1).any(dim=2)
    return torch.stack([any_TR[owner_T == q].sum(dim=0) for q in range(len(sizes))]).t()


def layer_bytes(
    dispatcher: str,
    mask_TE: torch.Tensor,
    sizes: Sequence[int],
    rank: int,
    d_model: int,
    d_low: int,
    elem_bytes: int,
    aoe_cache: bool,
    expert_choice: bool,
    threshold: bool = False,
    erc: bool = False,
    combine: str = "rank",
    order: Optional[Sequence[int]] = None,
) -> dict[str, int]:
    """Bytes rank `rank` sends in one forward and backward, keyed like `CommCounter.as_dict()` (zeros left out).

    mask_TE is the EP group's global routing mask over the concatenated batch, `sizes` its tokens per rank;
    `order` the placement's expert order (`Placement.order`; None for the contiguous one); `combine` the
    `alltoall` route.
    """
    ep = len(sizes)
    if order is not None:
        mask_TE = mask_TE[:, list(order)]
    pairs = _pairs(mask_TE, sizes, ep) if dispatcher == "alltoall" else _any_pairs(mask_TE, sizes, ep)
    rank_pairs = _any_pairs(mask_TE, sizes, ep).t().tolist() if dispatcher == "alltoall" else None
    out = bytes_from_pairs(
        dispatcher,
        pairs.tolist(),
        sizes,
        rank,
        mask_TE.shape[1],
        d_model,
        d_low,
        elem_bytes,
        aoe_cache,
        expert_choice,
        threshold,
        erc,
        combine,
        rank_pairs,
    )
    return {k: int(v) for k, v in out.items()}


def bytes_from_pairs(
    dispatcher: str,
    pairs: Sequence[Sequence[float]],
    sizes: Sequence[float],
    rank: int,
    num_experts: int,
    d_model: int,
    d_low: int,
    elem_bytes: int,
    aoe_cache: bool,
    expert_choice: bool,
    threshold: bool = False,
    erc: bool = False,
    combine: str = "rank",
    rank_pairs: Optional[Sequence[Sequence[float]]] = None,
) -> dict[str, float]:
    """The model above from the routing's pair counts: `pairs` is A (allgather) or W (alltoall) as [EP][EP]
    nested lists, counts or their expectations (`aoe_ep.plan` passes expected values under a routing model);
    `rank_pairs` is U, which the `alltoall` dispatcher's "rank" combine needs."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if dispatcher == "alltoall" and combine == "rank" and rank_pairs is None:
        raise ValueError("the alltoall dispatcher's rank combine needs rank_pairs (U: tokens per (rank, rank))")
    ep = len(sizes)
    n_local = num_experts // ep
    total, mine = sum(sizes), sizes[rank]
    others = [q for q in range(ep) if q != rank]
    out = {"sizes/fwd": (ep - 1) * 16}
    if dispatcher == "allgather":
        a = pairs
        out["tokens/fwd"] = (ep - 1) * mine * d_model * elem_bytes
        out["tokens/bwd"] = (total - mine) * d_model * elem_bytes
        if aoe_cache:
            out["norms/fwd"] = out["norms/bwd"] = (ep - 1) * n_local * total * elem_bytes
        out["counts/fwd"] = (ep - 1) * 8
        out["combine/fwd"] = sum(a[rank][q] for q in others) * d_model * elem_bytes
        out["combine/bwd"] = sum(a[q][rank] for q in others) * d_model * elem_bytes
    else:
        w = pairs
        out["stats/fwd"] = (ep - 1) * (3 * num_experts + 3 + threshold * (num_experts + 1)) * 8
        if expert_choice:
            out["probs/fwd"] = (ep - 1) * mine * num_experts * elem_bytes
        sent = sum(w[rank][q] for q in others)
        received = sum(w[q][rank] for q in others)
        if combine == "rank":
            u = rank_pairs
            rows_sent = sum(u[rank][q] for q in others)
            rows_received = sum(u[q][rank] for q in others)
            gate_bytes = max(4, elem_bytes)
            out["counts/fwd"] = (ep - 1) * 8
            out["dispatch/fwd"] = rows_sent * (d_model + expert_columns(n_local)) * elem_bytes
            out["dispatch/bwd"] = rows_received * d_model * elem_bytes
            if aoe_cache:
                out["cache/fwd"], out["cache/bwd"] = sent * d_low * elem_bytes, received * d_low * elem_bytes
            out["gates/fwd"], out["gates/bwd"] = sent * gate_bytes, received * gate_bytes
            out["combine/fwd"] = rows_received * d_model * elem_bytes
            out["combine/bwd"] = rows_sent * d_model * elem_bytes
        else:
            row = d_model + (d_low if aoe_cache else 0)
            out["counts/fwd"] = (ep - 1) * n_local * 8
            out["dispatch/fwd"], out["dispatch/bwd"] = sent * row * elem_bytes, received * row * elem_bytes
            out["combine/fwd"], out["combine/bwd"] = received * d_model * elem_bytes, sent * d_model * elem_bytes
    if erc:
        out["erc/fwd"] = (ep - 1) * n_local * num_experts * 4
    return {k: v for k, v in sorted(out.items()) if v}


def distinct_ranks_per_token(num_experts: int, top_k: int, ep: int) -> float:
    """Expected ranks holding at least one of a token's K experts under uniform routing: EP·(1 − C(n−n_l, K)/C(n,
    K))."""
    n_local = num_experts // ep
    return ep * (1.0 - comb(num_experts - n_local, top_k) / comb(num_experts, top_k))


def expected_bytes_per_token(
    dispatcher: str,
    d_model: int,
    d_low: int,
    num_experts: int,
    top_k: int,
    ep: int,
    elem_bytes: int = 4,
    aoe_cache: bool = True,
    combine: str = "rank",
) -> dict[str, float]:
    """Forward and backward bytes sent per token, per rank, under uniform top-K routing and equal token counts
    (the per-step constants, sizes/counts/stats, are left out: they do not grow with T)."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    n_local = num_experts // ep
    if ep == 1:
        return {"fwd": 0.0, "bwd": 0.0}
    p_any = distinct_ranks_per_token(num_experts, top_k, ep) / ep
    if dispatcher == "allgather":
        fwd = (ep - 1) * d_model + (aoe_cache * (ep - 1) * n_local * ep) + (ep - 1) * p_any * d_model
        return {"fwd": fwd * elem_bytes, "bwd": fwd * elem_bytes}
    remote = top_k * (ep - 1) / ep
    if combine == "rank":
        rows = (ep - 1) * p_any  # remote ranks a token reaches
        per_pair = (d_low * elem_bytes if aoe_cache else 0) + max(4, elem_bytes)
        return {
            "fwd": rows * (2 * d_model + expert_columns(n_local)) * elem_bytes + remote * per_pair,
            "bwd": rows * 2 * d_model * elem_bytes + remote * per_pair,
        }
    row = d_model + (d_low if aoe_cache else 0)
    return {"fwd": remote * (row + d_model) * elem_bytes, "bwd": remote * (row + d_model) * elem_bytes}
