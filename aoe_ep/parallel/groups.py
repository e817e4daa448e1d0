"""Process groups: world = data-parallel x expert-parallel, EP inner, from megatron-core's `parallel_state`.

Ranks [k·EP, (k+1)·EP) form one expert-parallel group; ranks with the same EP rank form an expert-data-parallel
group, over which the expert weights are replicated. Dense weights are replicated over the whole world.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    """Explicit groups handed to whoever needs them; `ep_group` is None when EP = 1."""

    world_size: int
    rank: int
    ep_size: int
    ep_rank: int
    ep_group: Optional[dist.ProcessGroup]
    expert_dp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]


def initialize_groups(expert_parallel_size: int) -> ParallelGroups:
    """Build the groups over an initialised default process group (gloo on CPU, NCCL on GPU)."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("initialize_groups needs torch.distributed.init_process_group to have run")
    world = dist.get_world_size()
    if world % expert_parallel_size:
        raise ValueError(f"world size {world} is not divisible by expert_parallel_size={expert_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel_size,
                                             create_gloo_process_groups=False)
    return ParallelGroups(
        world_size=world, rank=dist.get_rank(), ep_size=expert_parallel_size,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_group=parallel_state.get_expert_model_parallel_group() if expert_parallel_size > 1 else None,
        expert_dp_group=parallel_state.get_expert_data_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group())


def destroy_groups() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
