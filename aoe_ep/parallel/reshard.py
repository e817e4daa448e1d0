"""Move stacked expert tensors between the ranks of an EP group when the expert placement changes.

A rank's stack `[n/EP, ...]` holds the experts `src.experts[rank]`; after `move_experts` it holds
`dst.experts[rank]` (each in its placement's order). One all-to-all with uneven splits carries every expert that
changes rank; values are copied, never recomputed, so parameters and optimizer moments arrive bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from aoe_ep.moe.placement import Placement


def move_experts(local_X: torch.Tensor, src: Placement, dst: Placement, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's stack under `dst`, from its stack under `src` (collective over `group`, the EP group).

    A DTensor (an FSDP2 shard over the expert-data-parallel group) is gathered over that group, moved, and cut to
    the same shard again."""
    if src == dst:
        return local_X
    if isinstance(local_X, DTensor):
        moved = move_experts(local_X.full_tensor(), src, dst, group)
        return distribute_tensor(moved, local_X.device_mesh, local_X.placements, src_data_rank=None).to_local()
    rank = dist.get_rank(group)
    if src.num_devices != dist.get_world_size(group) or dst.num_devices != src.num_devices:
        raise ValueError(
            f"placements over {src.num_devices} and {dst.num_devices} ranks on an EP group of "
            f"{dist.get_world_size(group)}"
        )
    if local_X.shape[0] != len(src.experts[rank]):
        raise ValueError(f"rank {rank} holds {local_X.shape[0]} experts, its placement names {len(src.experts[rank])}")
    mine = {e: i for i, e in enumerate(src.experts[rank])}
    # To each rank q: the experts it will hold that this rank holds now, in q's new order.
    send_index = [mine[e] for q in range(src.num_devices) for e in dst.experts[q] if e in mine]
    send = [sum(e in mine for e in dst.experts[q]) for q in range(src.num_devices)]
    # From each rank q: the experts this rank will hold that q holds now, in this rank's new order.
    incoming = [[e for e in dst.experts[rank] if e in set(src.experts[q])] for q in range(src.num_devices)]
    recv = [len(chunk) for chunk in incoming]
    payload = local_X.index_select(0, torch.tensor(send_index, dtype=torch.int64, device=local_X.device))
    received = local_X.new_empty((sum(recv),) + tuple(local_X.shape[1:]))
    dist.all_to_all_single(received, payload.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    arrived = [e for chunk in incoming for e in chunk]
    order = [arrived.index(e) for e in dst.experts[rank]]
    return received.index_select(0, torch.tensor(order, dtype=torch.int64, device=local_X.device))
