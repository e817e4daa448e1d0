"""Data parallelism applied from outside the model: DDP or FSDP2 for the dense weights, a hand-written reduction
for the expert weights, and gradient clipping over both.

Expert parameters (`p.expert_parallel`) are sharded over the EP group and replicated over the expert-data-parallel
group, so they must not be reduced over the whole world: DDP ignores them, FSDP2 leaves them unsharded, and
`DataParallelModel.reduce_expert_grads` sums their gradients over the expert-DP group and divides by the world
size. DDP averages the dense gradients over the world, so both kinds end up with the same scale: the gradient of the
mean of the ranks' losses.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from aoe_ep.config import ConfigError
from aoe_ep.train.distributed import Runtime, all_reduce_
from aoe_ep.train.optim import is_expert_param


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) trainable parameters."""
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if is_expert_param(p) else dense).append(p)
    return dense, expert


class DataParallelModel:
    """The module to call for training, and how to switch gradient sync off for all but the last micro-batch.

    `module` is what forward runs through (DDP wrapper, FSDP2 root or the model itself); `model` is always the
    unwrapped decoder (its state dict keys carry no `module.` prefix).
    """

    def __init__(self, model: nn.Module, runtime: Runtime, kind: str):
        self.model = model
        self.kind = kind if runtime.world_size > 1 else "none"
        self.runtime = runtime
        expert = split_params(model)[1]
        if self.kind == "ddp":
            names = [n for n, p in model.named_parameters() if is_expert_param(p)]
            DDP._set_params_and_buffers_to_ignore_for_model(model, names)
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.module = DDP(model, device_ids=device_ids, process_group=runtime.groups.dp_group)
        elif self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            if "ignored_params" not in inspect.signature(fully_shard).parameters:
                raise ConfigError(f"train.dense_parallel: 'fsdp' needs FSDP2 with ignored_params (torch >= 2.7), "
                                  f"this is torch {torch.__version__}; use 'ddp'")
            mesh = init_device_mesh(runtime.device.type, (runtime.world_size,), mesh_dim_names=("world",))
            ignored = set(expert)
            for block in model.blocks:
                fully_shard(block, mesh=mesh, ignored_params=ignored)
            fully_shard(model, mesh=mesh, ignored_params=ignored)
            self.module = model
        else:
            self.module = model
        # After wrapping: FSDP2 replaces the dense parameters by DTensor ones.
        self.dense_params, self.expert_params = split_params(model)

    def sync_context(self, last_micro_batch: bool):
        """Reduce dense gradients only on the last micro-batch of a step (gradient accumulation)."""
        if self.kind == "ddp" and not last_micro_batch:
            return self.module.no_sync()
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def reduce_expert_grads(self) -> None:
        """Σ over the expert-DP group, / world size: one flat all-reduce for all expert gradients."""
        group = self.runtime.groups.expert_dp_group
        if self.kind == "none" or not self.expert_params:
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

        Dense gradients are replicated (DDP) or sharded over the world (FSDP2: the shards' squares are summed);
        expert gradients are sharded over the EP group (their squares are summed over it).
        """
        dense = [_local(p.grad) for p in self.dense_params if p.grad is not None]
        expert = [p.grad for p in self.expert_params if p.grad is not None]
        device = self.runtime.device
        dense_sq = _sum_of_squares(dense, device)
        if self.kind == "fsdp":
            all_reduce_(dense_sq)
        expert_sq = _sum_of_squares(expert, device)
        if self.runtime.groups.ep_group is not None:
            all_reduce_(expert_sq, group=self.runtime.groups.ep_group)
        total = float((dense_sq + expert_sq).sqrt())
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
