"""Where a run executes (training or evaluation): device, process group, the DP x EP groups and their device meshes.

The one place a device and a backend are chosen. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) the default
process group comes from the environment; a plain `aoe-ep train` runs as a world of one on an in-process store, so
that every code path (groups, meshes, torch.distributed.checkpoint) is the same with one process or many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from aoe_ep.config import ConfigError, TrainConfig
from aoe_ep.parallel.groups import ParallelGroups, initialize_groups


@dataclass
class Runtime:
    """device: this rank's device; groups: DP x EP process groups and their meshes (`initialize_groups`);
    owns_process_group: whether `teardown` should destroy the default group (False when the caller created it);
    restore_flush_denormal: the CPU's flush-denormal setting before `flush_denormals`, which `teardown` restores."""

    device: torch.device
    groups: ParallelGroups
    owns_process_group: bool
    restore_flush_denormal: Optional[bool] = None

    def flush_denormals(self) -> None:
        """Flush denormal floats to zero on the CPU for the rest of this run (`teardown` restores the setting)."""
        if self.restore_flush_denormal is None:
            self.restore_flush_denormal = denormals_flushed()
        torch.set_flush_denormal(True)

    @property
    def mesh(self) -> DeviceMesh:
        """("dp", "ep") over the world: rows are the expert-parallel groups, columns the expert-data-parallel ones."""
        return self.groups.mesh

    @property
    def expert_mesh(self) -> DeviceMesh:
        """The same ranks and groups as ("ep", "dp"): an expert tensor splits over EP, then over expert-DP (FSDP2)."""
        return self.groups.expert_mesh

    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    @property
    def ep_size(self) -> int:
        return self.groups.ep_size

    @property
    def is_main(self) -> bool:
        return self.groups.rank == 0


def pick_device(cfg: TrainConfig) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (or asked for), else cpu."""
    want = cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but torch sees no CUDA device")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup_runtime(cfg: TrainConfig, expert_parallel_size: int) -> Runtime:
    """Initialise (or join) the default process group, then the DP x EP groups and their device meshes."""
    device = pick_device(cfg)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            dist.init_process_group(
                backend, timeout=timedelta(minutes=30), device_id=device if device.type == "cuda" else None
            )
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % expert_parallel_size:
        raise ConfigError(
            f"parallel.expert_parallel_size: {expert_parallel_size} does not divide the world size {world}"
        )
    groups = initialize_groups(expert_parallel_size, device.type)
    return Runtime(device=device, groups=groups, owns_process_group=owns)


def denormals_flushed() -> bool:
    """Whether the CPU flushes denormal floats to zero now (torch has a setter only): a denormal times one is zero."""
    return bool(torch.tensor([1e-310], dtype=torch.float64).mul(1.0)[0] == 0)


def teardown(runtime: Runtime) -> None:
    """Restore the flush-denormal setting; destroy the default group when the runtime created it (the run's DP x EP
    groups go with it; a caller that owns the default group keeps them until it destroys that group)."""
    if runtime.restore_flush_denormal is not None:
        torch.set_flush_denormal(runtime.restore_flush_denormal)
        runtime.restore_flush_denormal = None
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce that is a no-op in a world of one (no collective on the critical path)."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
