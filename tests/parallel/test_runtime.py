"""One topology: the runtime of DP 2 x EP 2 on 4 gloo ranks creates each expert-parallel row and expert-data-parallel
column group once, and its ("dp", "ep") and ("ep", "dp") meshes hand out those same groups."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from aoe_ep.config import TrainConfig
from aoe_ep.parallel.spawn import run_distributed


def _worker(rank: int, world: int) -> dict:
    from aoe_ep.parallel.runtime import setup_runtime, teardown

    created = []
    new_group = c10d._new_group_with_tag  # every new_group, whoever calls it (device meshes included), ends here

    def counting(ranks=None, *args, **kwargs):
        created.append(tuple(sorted(ranks)))
        return new_group(ranks, *args, **kwargs)

    c10d._new_group_with_tag = counting
    try:
        held_before = len(c10d._world.pg_map)
        runtime = setup_runtime(TrainConfig(device="cpu"), expert_parallel_size=2)
        held = len(c10d._world.pg_map) - held_before
        groups = runtime.groups
        out = {
            "created": created,
            "held": held,
            "ep": dist.get_process_group_ranks(groups.ep_group),
            "expert_dp": dist.get_process_group_ranks(groups.expert_dp_group),
            "dense_is_world": groups.dp_group is dist.group.WORLD,
            "mesh_shares": (
                runtime.mesh.get_group("ep") is groups.ep_group
                and runtime.mesh.get_group("dp") is groups.expert_dp_group
                and runtime.expert_mesh.get_group("ep") is groups.ep_group
                and runtime.expert_mesh["dp"].get_group() is groups.expert_dp_group
            ),
            "ep_rank": groups.ep_rank,
        }
        teardown(runtime)
    finally:
        c10d._new_group_with_tag = new_group
    return out


def test_dp2_ep2_builds_each_group_once():
    results = run_distributed(4, _worker)
    for rank, got in enumerate(results):
        # two EP rows and two expert-DP columns, each created once (every rank takes part in every new_group call)
        assert sorted(got["created"]) == [(0, 1), (0, 2), (1, 3), (2, 3)], rank
        assert got["held"] == 2, rank  # this rank's row and column; dense weights use the default group
        assert got["ep"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert got["expert_dp"] == [rank % 2, rank % 2 + 2]
        assert got["ep_rank"] == rank % 2
        assert got["dense_is_world"] and got["mesh_shares"], rank


def test_flushing_denormals_lasts_until_teardown():
    from aoe_ep.parallel.runtime import denormals_flushed, setup_runtime, teardown

    assert not denormals_flushed()
    runtime = setup_runtime(TrainConfig(device="cpu"), expert_parallel_size=1)
    try:
        runtime.flush_denormals()
        assert denormals_flushed()
        runtime.flush_denormals()  # a second call keeps the setting found first
    finally:
        teardown(runtime)
    assert not denormals_flushed()
