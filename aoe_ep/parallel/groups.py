"""Process groups: world = data-parallel x expert-parallel, EP inner, built once as a ("dp", "ep") device mesh.

Ranks [k·EP, (k+1)·EP) form one expert-parallel group (a row of the mesh); ranks with the same EP rank form an
expert-data-parallel group (a column), over which the expert weights are replicated. Dense weights are replicated
over the whole world, so their group is the default one. The mesh creates each row and column group once; the
("ep", "dp") view that expert tensors are sharded over is built from those same groups, so every pair of ranks shares
one communicator per purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelGroups:
    """Explicit groups handed to whoever needs them; `ep_group` is None when EP = 1. mesh: ("dp", "ep") over the
    world; expert_mesh: the same ranks and groups as ("ep", "dp"), the order in which an expert tensor is split (over
    the EP group into each rank's experts, then over its expert-DP group)."""

    world_size: int
    rank: int
    ep_size: int
    ep_rank: int
    ep_group: Optional[dist.ProcessGroup]
    expert_dp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    mesh: DeviceMesh
    expert_mesh: DeviceMesh


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def initialize_groups(expert_parallel_size: int, device_type: Optional[str] = None) -> ParallelGroups:
    """Build the groups over an initialised default process group (gloo on CPU, NCCL on GPU); `device_type` defaults
    to the one the default group's backend serves."""
    if not dist.is_initialized():
        raise RuntimeError("initialize_groups needs torch.distributed.init_process_group to have run")
    world = dist.get_world_size()
    if expert_parallel_size < 1 or world % expert_parallel_size:
        raise ValueError(f"world size {world} is not divisible by expert_parallel_size={expert_parallel_size}")
    device_type = device_type or _device_type()
    mesh = init_device_mesh(
        device_type, (world // expert_parallel_size, expert_parallel_size), mesh_dim_names=("dp", "ep")
    )
    ep_group, expert_dp_group = mesh.get_group("ep"), mesh.get_group("dp")
    expert_mesh = DeviceMesh.from_group(
        [ep_group, expert_dp_group], device_type, mesh=mesh.mesh.t().contiguous(), mesh_dim_names=("ep", "dp")
    )
    return ParallelGroups(
        world_size=world,
        rank=dist.get_rank(),
        ep_size=expert_parallel_size,
        ep_rank=mesh.get_local_rank("ep"),
        ep_group=ep_group if expert_parallel_size > 1 else None,
        expert_dp_group=expert_dp_group,
        dp_group=dist.group.WORLD,
        mesh=mesh,
        expert_mesh=expert_mesh,
    )
