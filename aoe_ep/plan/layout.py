"""One layout's plan: what a rank holds, computes and sends per step under DP × EP, and whether it fits.

    plan = plan_layout(load_config("paper/aoe_4b"), ep=8, dp=4, gpu="h100")
    plan.bytes_total, plan.step_seconds["total"], plan.fits, plan.max_micro_batch

The rank described is rank 0 of an EP group: under `hot_share` it holds the hot expert, so it receives the most rows
and computes the most; under uniform routing every rank is alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from aoe_ep.config import Config, ConfigError, MoEConfig
from aoe_ep.hardware import GPU, GPUS, GPUS_PER_NODE
from aoe_ep.parallel.comm_model import bytes_from_pairs
from aoe_ep.plan.activations import MicroBatch, activation_bytes, routed_rows
from aoe_ep.plan.flops import step_flops
from aoe_ep.plan.recompute import checkpointed_bytes, rebuilt_block_bytes, recompute_flops, recompute_traffic_bytes
from aoe_ep.plan.routing import RoutingModel, routing_model
from aoe_ep.plan.state import FP32, ParamShape, RankState, gradient_sync_bytes, rank_state
from aoe_ep.train.batches import plan_batches

ADAMW_BYTES_PER_ELEMENT = 7 * FP32  # fused AdamW reads weight, gradient, two moments; writes weight, two moments


@dataclass(frozen=True)
class Plan:
    """Per rank and per optimiser step unless named otherwise (`activations`: one micro-batch, as kept under
    `activation_checkpointing` on every `ac_every`-th block; `bytes_transient` adds the block a `full` backward
    rebuilds, or the MoE layer's expert pre-activations a `selective` one does; `flops["recompute"]`: the forward
    that `full` runs again, or the experts' gate and up products that `selective` does)."""

    ep: int
    dp: int
    world: int
    gpu: str
    precision: str
    dispatcher: Optional[str]
    hot_expert_share: Optional[float]
    micro_batch: int
    num_micro_batches: int
    params_dense: int
    params_expert: int
    bytes_weights: int
    bytes_grads: int
    bytes_optimizer: int
    bytes_activations: float
    activations: dict
    bytes_transient: float
    bytes_total: float
    bytes_usable: float
    flops_per_step: float
    flops: dict
    comm_bytes_per_step: dict
    step_seconds: dict
    fits: bool
    max_micro_batch: int
    activation_checkpointing: str = "none"
    ac_every: int = 1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compute_bytes(cfg: Config) -> int:
    """The activation dtype's size: a plan is for GPUs, where `auto` means bf16 autocast."""
    return FP32 if cfg.train.precision == "fp32" else 2


def _routing(cfg: Config, ep: int, tokens: int, hot_share: Optional[float]) -> Optional[RoutingModel]:
    moe = cfg.moe if cfg.model.ffn == "moe" else None
    if moe is None:
        if hot_share is not None:
            raise ConfigError("--hot-expert-share: the model has no MoE layers (model.ffn is 'dense')")
        return None
    if moe.selection == "expert_choice":
        if hot_share is not None:
            raise ConfigError("--hot-expert-share: under expert choice every expert takes the same number of rows")
        return routing_model(moe.num_experts, routed_rows(moe, ep * tokens) / (ep * tokens), None)
    try:
        return routing_model(moe.num_experts, moe.top_k, hot_share)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _micro_batch(cfg: Config, mb: int, ep: int, routing: Optional[RoutingModel]) -> tuple[MicroBatch, float, dict]:
    """The micro-batch, the routed rows reaching this rank's experts per MoE layer, and its activation bytes without
    activation checkpointing."""
    c = compute_bytes(cfg)
    micro = MicroBatch(batch=mb, seq_len=cfg.data.seq_len, compute_bytes=c, autocast=c != FP32)
    rows = ep * micro.tokens * routing.rank_rows_per_token(0, ep) if routing is not None else 0.0
    returned = (0.0, 0.0)
    if routing is not None and ep > 1 and cfg.moe.dispatcher == "allgather":
        returned = (
            ep * micro.tokens * (1.0 - routing.p_none(0, ep)),
            micro.tokens * sum(1.0 - routing.p_none(q, ep) for q in range(ep)),
        )
    return micro, rows, activation_bytes(cfg, micro, ep, rows, returned)


def _transient_bytes(cfg: Config, micro: MicroBatch) -> float:
    """The largest short-lived tensors, at the cross-entropy: the logits in the compute dtype and the fp32
    gradient of the log-softmax [T, V]."""
    return micro.tokens * cfg.model.vocab_size * (micro.compute_bytes + FP32)


def ep_layer_bytes(
    moe: MoEConfig, ep: int, tokens_per_rank: int, elem_bytes: int, routing: RoutingModel, rank: int = 0
) -> dict[str, float]:
    """Bytes rank `rank` of the EP group sends in one MoE layer's forward and backward: the communication model of
    `aoe_ep.parallel.comm_model` with the routing model's expected pair counts, every rank holding
    `tokens_per_rank` tokens. Keys as the dispatchers' `CommCounter.as_dict()`."""
    if ep == 1:
        return {}
    pairs = routing.pairs(moe.dispatcher, tokens_per_rank, ep)
    return bytes_from_pairs(
        moe.dispatcher,
        pairs,
        [tokens_per_rank] * ep,
        rank,
        moe.num_experts,
        moe.d_model,
        moe.d_low,
        elem_bytes,
        aoe_cache=moe.scorer == "aoe",
        expert_choice=moe.selection == "expert_choice",
        erc=moe.erc_loss_coeff > 0,
        rank_pairs=routing.rank_pairs(tokens_per_rank, ep),
    )


def _step_seconds(
    gpu: GPU,
    precision_bytes: int,
    flops: float,
    memory_bytes: float,
    ep_bytes: float,
    dp_bytes: float,
    ep: int,
    world: int,
) -> dict[str, float]:
    """Seconds per part, added without overlap. EP groups are consecutive ranks, so one of up to 8 stays in a node;
    a data-parallel group (the world, or the expert-DP group with stride EP) crosses nodes when the world does."""
    peak = gpu.bf16_flops if precision_bytes == 2 else gpu.fp32_flops
    out = {"compute": flops / peak, "memory": memory_bytes / gpu.hbm_bytes_per_s, "intra_node": 0.0, "inter_node": 0.0}
    for nbytes, group in ((ep_bytes, ep), (dp_bytes, world)):
        if group <= GPUS_PER_NODE:
            out["intra_node"] += nbytes / gpu.nvlink_bytes_per_s
        else:
            out["inter_node"] += nbytes / gpu.nic_bytes_per_s
    out["total"] = sum(out.values())
    return out


def _max_micro_batch(
    cfg: Config, ep: int, world: int, routing: Optional[RoutingModel], state: RankState, usable: float
) -> int:
    """The largest micro-batch whose memory fits and that splits the global batch evenly over the ranks (0: none).
    Activations are affine in the micro-batch size."""
    mode, every = cfg.train.activation_checkpointing, cfg.train.ac_every

    def need(mb: int) -> float:
        micro, _, acts = _micro_batch(cfg, mb, ep, routing)
        kept = checkpointed_bytes(cfg, micro, acts, mode, every)
        return sum(kept.values()) + _transient_bytes(cfg, micro) + rebuilt_block_bytes(cfg, acts, mode)

    fixed = state.bytes_weights + state.bytes_grads + state.bytes_optimizer
    one, two = need(1), need(2)
    slope, intercept = two - one, 2 * one - two
    largest = int((usable - fixed - intercept) // slope) if usable > fixed + intercept + slope else 0
    samples = cfg.train.global_batch_tokens // cfg.data.seq_len
    if samples % world:
        return 0
    per_rank = samples // world
    return max((b for b in range(1, min(largest, per_rank) + 1) if per_rank % b == 0), default=0)


def plan_layout(
    cfg: Config,
    ep: int,
    dp: int,
    micro_batch: Optional[int] = None,
    gpu: str = "h100",
    hot_share: Optional[float] = None,
    params: Optional[list[ParamShape]] = None,
) -> Plan:
    """The plan of rank 0 under world = dp × ep (EP inner), `micro_batch` sequences per rank (default:
    train.micro_batch_size) on `gpu` (a key of `aoe_ep.hardware.GPUS`); `params`: `model_parameters(cfg)`,
    to build the meta model once for many layouts."""
    if gpu not in GPUS:
        raise ConfigError(f"--gpu: {gpu!r} is not one of {', '.join(sorted(GPUS))}")
    for name, value in (("--ep", ep), ("--dp", dp)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
    if cfg.model.ffn != "moe" and ep > 1:
        raise ConfigError(f"--ep: {ep} needs MoE layers, model.ffn is 'dense'")
    if cfg.model.ffn == "moe" and cfg.moe.num_experts % ep:
        raise ConfigError(f"--ep: moe.num_experts={cfg.moe.num_experts} is not divisible by {ep}")
    mb = cfg.train.micro_batch_size if micro_batch is None else micro_batch
    if not isinstance(mb, int) or mb < 1:
        raise ConfigError(f"--micro-batch: must be a positive integer, got {mb!r}")
    world = ep * dp
    batches = plan_batches(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=mb)), world, 0
    )
    hardware = GPUS[gpu]
    routing = _routing(cfg, ep, mb * cfg.data.seq_len, hot_share)
    steps = batches.num_micro_batches
    state = rank_state(cfg, ep, world, params, steps)
    mode, every = cfg.train.activation_checkpointing, cfg.train.ac_every
    micro, rows, plain = _micro_batch(cfg, mb, ep, routing)
    acts = checkpointed_bytes(cfg, micro, plain, mode, every)

    layer = ep_layer_bytes(cfg.moe, ep, micro.tokens, micro.compute_bytes, routing) if routing is not None else {}
    comm = {f"ep.{name}": steps * cfg.model.n_layers * v for name, v in layer.items()}
    if mode == "full":  # a recomputed MoE layer runs its forward collectives again
        again = -(-cfg.model.n_layers // every)
        comm.update(
            {f"ep.{name}": comm[f"ep.{name}"] + steps * again * v for name, v in layer.items() if name.endswith("/fwd")}
        )
    dp_comm = gradient_sync_bytes(cfg.train.dense_parallel, world, ep, state.params_dense, state.params_expert, steps)
    comm.update({f"dp.{name}": v for name, v in dp_comm.items()})

    flops = step_flops(cfg, steps * micro.tokens, steps * rows)
    if mode != "none":
        flops["recompute"] = recompute_flops(cfg, flops, mode, every)
    bytes_activations = sum(acts.values())
    memory = (
        steps * 2 * bytes_activations
        + (steps - 1) * 2 * FP32 * state.numel_local
        + ADAMW_BYTES_PER_ELEMENT * state.numel_local
        + steps * recompute_traffic_bytes(plain, acts, mode)
    )
    seconds = _step_seconds(
        hardware,
        micro.compute_bytes,
        sum(flops.values()),
        memory,
        sum(v for k, v in comm.items() if k.startswith("ep.")),
        sum(dp_comm.values()),
        ep,
        world,
    )
    transient = _transient_bytes(cfg, micro) + rebuilt_block_bytes(cfg, plain, mode)
    total = state.bytes_weights + state.bytes_grads + state.bytes_optimizer + bytes_activations + transient
    usable = hardware.usable_memory_bytes
    return Plan(
        ep=ep,
        dp=dp,
        world=world,
        gpu=gpu,
        precision="fp32" if micro.compute_bytes == FP32 else "bf16",
        dispatcher=cfg.moe.dispatcher if cfg.model.ffn == "moe" and ep > 1 else None,
        hot_expert_share=hot_share,
        micro_batch=mb,
        num_micro_batches=steps,
        params_dense=state.params_dense,
        params_expert=state.params_expert,
        bytes_weights=state.bytes_weights,
        bytes_grads=state.bytes_grads,
        bytes_optimizer=state.bytes_optimizer,
        bytes_activations=bytes_activations,
        activations=acts,
        bytes_transient=transient,
        bytes_total=total,
        bytes_usable=usable,
        flops_per_step=sum(flops.values()),
        flops=flops,
        comm_bytes_per_step=comm,
        step_seconds=seconds,
        fits=total <= usable,
        max_micro_batch=_max_micro_batch(cfg, ep, world, routing, state, usable),
        activation_checkpointing=mode,
        ac_every=every,
    )
