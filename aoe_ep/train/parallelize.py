"""Data parallelism applied from outside the model: DDP or FSDP2 for the dense weights, FSDP2 or a hand-written
reduction for the expert weights, and gradient clipping over both.

Expert parameters (`p.expert_parallel`) are sharded over the EP group and replicated over the expert-data-parallel
group (the "dp" dimension of the ("dp", "ep") mesh), so they must not be reduced over the whole world. Both kinds of
gradient end with the same scale, the gradient of the mean of the ranks' losses:

- fsdp: the dense weights are sharded over the world; each MoE layer's expert modules get their own `fully_shard`
  over the expert-DP mesh dimension, so that an expert-DP replica holds 1/expert-DP of its experts' weights,
  gradients and Adam state, and their reduce-scatter runs inside backward, overlapped with it. Their gradients
  are summed over the expert-DP group and divided by the world size (`set_gradient_divide_factor`), as the dense
  ones are averaged over the world.
- ddp: DDP averages the dense gradients over the world and ignores the experts; after backward
  `DataParallelModel.reduce_expert_grads` sums theirs over the expert-DP group in one flat all-reduce and divides
  by the world size. Expert state is replicated over the expert-DP group.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP

from aoe_ep.config import ConfigError
from aoe_ep.moe import MoELayer
from aoe_ep.parallel.runtime import Runtime, all_reduce_
from aoe_ep.train.optim import is_expert_param


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) trainable parameters."""
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if is_expert_param(p) else dense).append(p)
    return dense, expert


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The children of each MoE layer that hold its expert-parallel parameters (the experts, and AoE's sharded
    Wdown under `allgather`); a child that mixes expert and dense parameters cannot be sharded on one mesh."""
    found = []
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        for name, child in layer.named_children():
            kinds = {is_expert_param(p) for p in child.parameters()}
            if kinds == {True, False}:
                raise TypeError(f"{type(child).__name__} ({name}) mixes expert-parallel and replicated parameters")
            if kinds == {True}:
                found.append(child)
    return found


def expert_shard_placement(shard_size: int):
    """FSDP2's placement for an expert tensor [E_local, ...]: dim 0 when E_local splits evenly over the expert-DP
    group, else the first dim that does (so that a rank holding fewer experts than the group still holds its
    share), else dim 0 with FSDP2's uneven chunks."""

    def placement(p: nn.Parameter) -> Shard:
        dims = [d for d in range(p.ndim) if p.shape[d] % shard_size == 0]
        return Shard(dims[0] if dims else 0)

    return placement


class DataParallelModel:
    """The module to call for training, and how to switch gradient sync off for all but the last micro-batch.

    `module` is what forward runs through (DDP wrapper, FSDP2 root or the model itself); `model` is always the
    unwrapped decoder (its state dict keys carry no `module.` prefix).
    """

    def __init__(self, model: nn.Module, runtime: Runtime, kind: str):
        self.model = model
        self.kind = kind if runtime.world_size > 1 else "none"
        self.runtime = runtime
        expert_names = {n for n, p in model.named_parameters() if is_expert_param(p)}
        if self.kind == "ddp":
            DDP._set_params_and_buffers_to_ignore_for_model(model, sorted(expert_names))
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # Every buffer is the same on every rank by construction (RoPE tables from the config; the balancing bias
            # moves with global counts and is compared across ranks before each checkpoint), so DDP's broadcast of
            # them from rank 0 before every forward would be a collective that only hides a divergence.
            self.module = DDP(
                model, device_ids=device_ids, process_group=runtime.groups.dp_group, broadcast_buffers=False
            )
        elif self.kind == "fsdp":
            self._shard(model)
            self.module = model
            # FSDP2's DTensor parameters replace the tagged ones: tag them again.
            for name, p in model.named_parameters():
                if name in expert_names:
                    p.expert_parallel = True
        else:
            self.module = model
        self.dense_params, self.expert_params = split_params(model)

    def _shard(self, model: nn.Module) -> None:
        """Experts over the expert-DP mesh dimension first, then blocks and root over the world (a parent's
        `fully_shard` leaves the parameters of an already sharded child alone)."""
        from torch.distributed.fsdp import fully_shard

        if "shard_placement_fn" not in inspect.signature(fully_shard).parameters:
            raise ConfigError(
                f"train.dense_parallel: 'fsdp' needs FSDP2 with shard_placement_fn (torch >= 2.6), "
                f"this is torch {torch.__version__}; use 'ddp'"
            )
        rt = self.runtime
        # AoE's scorer returns its cache as a view; nothing writes into it in place, which is what FSDP2 warns about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPAoEScorer\) returned a view tensor")
        expert_dp_mesh: DeviceMesh = rt.expert_mesh["dp"]
        for child in expert_modules(model):
            fully_shard(child, mesh=expert_dp_mesh, shard_placement_fn=expert_shard_placement(expert_dp_mesh.size()))
            child.set_gradient_divide_factor(float(rt.world_size))
            if rt.device.type != "cuda":  # gloo has no pre-multiplied sum: divide after a plain sum
                child.set_force_sum_reduction_for_comms(True)
        world_mesh = init_device_mesh(rt.device.type, (rt.world_size,), mesh_dim_names=("world",))
        for block in model.blocks:
            fully_shard(block, mesh=world_mesh)
        fully_shard(model, mesh=world_mesh)

    def sync_context(self, last_micro_batch: bool):
        """Reduce dense gradients only on the last micro-batch of a step (gradient accumulation)."""
        if self.kind == "ddp" and not last_micro_batch:
            return self.module.no_sync()
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def reduce_expert_grads(self) -> None:
        """DDP mode: Σ over the expert-DP group, / world size, in one flat all-reduce for all expert gradients
        (FSDP2 has reduced them during backward)."""
        group = self.runtime.groups.expert_dp_group
        if self.kind != "ddp" or not self.expert_params:
            return
        for p in self.expert_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.expert_params]
        flat = torch._utils._flatten_dense_tensors(grads)
        all_reduce_(flat, group=group)
        flat.div_(self.runtime.world_size)
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale all gradients so that their global L2 norm is at most `max_norm`; returns the norm before.

        Under FSDP2 every gradient element lives on exactly one rank (dense ones sharded over the world, expert ones
        over EP x expert-DP): one sum of squares over the world. Under DDP the dense gradients are replicated and the
        expert ones sharded over the EP group (their squares are summed over it).
        """
        dense = [_local(p.grad) for p in self.dense_params if p.grad is not None]
        expert = [_local(p.grad) for p in self.expert_params if p.grad is not None]
        device = self.runtime.device
        dense_sq = _sum_of_squares(dense, device)
        expert_sq = _sum_of_squares(expert, device)
        if self.kind == "fsdp":
            total_sq = all_reduce_(dense_sq + expert_sq)
        else:
            if self.runtime.groups.ep_group is not None:
                all_reduce_(expert_sq, group=self.runtime.groups.ep_group)
            total_sq = dense_sq + expert_sq
        total = float(total_sq.sqrt())
        if math.isfinite(total) and total > max_norm:
            torch._foreach_mul_(dense + expert, max_norm / (total + 1e-6))
        return total


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device, dtype=torch.float32)
    norms = torch._foreach_norm(tensors, 2.0)
    return torch.stack([n.float() for n in norms]).square().sum()
