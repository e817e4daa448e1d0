"""Training state on one rank: parameters (dense, expert) and the bytes of weights, gradients and AdamW moments.

The trainer keeps fp32 master weights and fp32 gradients in every precision (bf16 is autocast), and AdamW two fp32
moments per parameter (`exp_avg`, `exp_avg_sq`) plus a scalar step counter per parameter (torch's fused AdamW keeps
it as a 1-element fp32 tensor). Shapes are read from the model itself, built on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aoe_ep.config import Config
from aoe_ep.moe.scorers import scorer_sharded_over_ep
from aoe_ep.train.optim import ADAM_MOMENTS, FP32  # what the trainer's AdamW keeps per element


@dataclass(frozen=True)
class ParamShape:
    """One parameter of the single-device model; `expert`: sharded over the EP group on dim 0 under EP > 1."""

    name: str
    shape: tuple[int, ...]
    expert: bool


def model_parameters(cfg: Config) -> list[ParamShape]:
    """Every parameter of the decoder as built with all experts on one device (meta tensors: nothing allocated)."""
    from aoe_ep.model import Decoder

    with torch.device("meta"):
        model = Decoder(cfg.model, cfg.moe)
    return [
        ParamShape(name, tuple(p.shape), bool(getattr(p, "expert_parallel", False)))
        for name, p in model.named_parameters()
        if p.requires_grad
    ]


def sharded_over_ep(param: ParamShape, cfg: Config, ep: int) -> bool:
    """Expert weights, and the scorer's weight where the layer splits it (`scorer_sharded_over_ep`), are split over
    the EP group; everything else is replicated like a dense weight."""
    if ep == 1:
        return False
    if param.expert:
        return True
    return cfg.moe is not None and param.name.endswith("scorer.w_down") and scorer_sharded_over_ep(cfg.moe, ep)


def state_shards(dense_parallel: str, world: int, ep: int) -> tuple[int, int]:
    """How many ranks share one copy of the dense state and of this rank's experts' state (weights, gradients and
    moments alike): FSDP2 shards the dense state over the world and the expert state over the expert-data-parallel
    group (world / EP); DDP replicates both."""
    if dense_parallel == "fsdp" and world > 1:
        return world, world // ep
    return 1, 1


def gradient_shards(dense_parallel: str, world: int, ep: int, micro_batches: int) -> tuple[int, int]:
    """Like `state_shards`, for the gradients at their peak: FSDP2 accumulates unsharded gradients over the
    micro-batches that skip the reduce-scatter (`set_requires_gradient_sync(False)`), so with gradient accumulation
    a rank holds them whole until the step's last backward."""
    if micro_batches > 1:
        return 1, 1
    return state_shards(dense_parallel, world, ep)


def _shard_numel(shape: tuple[int, ...], shards: int, dim: int = 0) -> int:
    """FSDP2 splits `dim` into `shards` chunks of ⌈size / shards⌉ (the first rank's is the largest)."""
    if shards == 1:
        return math.prod(shape)
    return math.ceil(shape[dim] / shards) * math.prod(shape) // shape[dim]


def _expert_shard_dim(shape: tuple[int, ...], shards: int) -> int:
    """The dimension FSDP2 shards an expert tensor on over the expert-DP group (the trainer's placement rule)."""
    from aoe_ep.train.parallelize import expert_shard_placement

    return expert_shard_placement(shards)(torch.empty(shape, device="meta")).dim


@dataclass(frozen=True)
class RankState:
    """Per rank: parameters held (dense, expert: this rank's n/EP experts; before any FSDP2 sharding) and the bytes
    of the state it keeps."""

    params_dense: int
    params_expert: int
    bytes_weights: int
    bytes_grads: int
    bytes_optimizer: int
    numel_local: int


def rank_state(
    cfg: Config, ep: int, world: int, params: list[ParamShape] | None = None, micro_batches: int = 1
) -> RankState:
    """The state rank 0 of a world of `world` ranks holds with expert-parallel size `ep` (FSDP2's first shard is
    the largest) and `micro_batches` per step; `params`: `model_parameters(cfg)` when the caller has them."""
    kind = cfg.train.dense_parallel
    dense_shards, expert_shards = state_shards(kind, world, ep)
    dense_grad_shards, expert_grad_shards = gradient_shards(kind, world, ep, micro_batches)
    params_dense = params_expert = numel = grad_numel = 0
    tensors = 0
    for p in params if params is not None else model_parameters(cfg):
        shape = p.shape
        if p.expert or sharded_over_ep(p, cfg, ep):
            shape = (shape[0] // ep,) + shape[1:]
            params_expert += math.prod(shape)
            numel += _shard_numel(shape, expert_shards, _expert_shard_dim(shape, expert_shards))
            grad_numel += _shard_numel(shape, expert_grad_shards, _expert_shard_dim(shape, expert_grad_shards))
        else:
            params_dense += math.prod(shape)
            numel += _shard_numel(shape, dense_shards)
            grad_numel += _shard_numel(shape, dense_grad_shards)
        tensors += 1
    return RankState(
        params_dense=params_dense,
        params_expert=params_expert,
        bytes_weights=numel * FP32,
        bytes_grads=grad_numel * FP32,
        bytes_optimizer=ADAM_MOMENTS * numel * FP32 + tensors * FP32,
        numel_local=numel,
    )


def gradient_sync_bytes(
    dense_parallel: str, world: int, ep: int, dense_numel: int, expert_numel: int, micro_batches: int
) -> dict[str, float]:
    """Bytes one rank sends per step to keep the state consistent, by collective (ring algorithms: an all-reduce
    sends 2(N−1)/N of the buffer, an all-gather or reduce-scatter (N−1)/N). `dense_numel` / `expert_numel`: the
    unsharded element counts on this rank.

    DDP: one all-reduce of the dense gradients over the world per step (no_sync on the other micro-batches), and of
    the expert gradients over the expert-data-parallel group (world / EP). FSDP2 (dense over the world, experts over
    the expert-DP group as `state_shards` says): the weights are all-gathered in forward and again in backward on
    every micro-batch (reshard after forward), the gradients reduce-scattered once per step.
    """
    expert_group = world // ep
    out: dict[str, float] = {}

    def ring(n: int) -> float:
        return (n - 1) / n

    dense_shards, expert_shards = state_shards(dense_parallel, world, ep)
    for part, numel, group, shards in (
        ("dense", dense_numel, world, dense_shards),
        ("expert", expert_numel, expert_group, expert_shards),
    ):
        if group == 1 or numel == 0:
            continue
        if shards > 1:
            out[f"allgather_weights/{part}"] = 2 * micro_batches * ring(group) * numel * FP32
            out[f"reduce_scatter_grads/{part}"] = ring(group) * numel * FP32
        else:
            out[f"allreduce_grads/{part}"] = 2 * ring(group) * numel * FP32
    return out
