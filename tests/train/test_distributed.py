"""Data and expert parallelism in the trainer, on 2 gloo ranks, against single-process runs of the same global batch:
DDP and FSDP2 (dense weights) with EP = 1, and EP = 2 with both dispatchers, reach the single-process losses step by
step, and checkpoints move between layouts (1 rank <-> 2 ranks, EP 1 <-> EP 2, FSDP2 -> 1 rank).

With EP = 1 a rank's micro-batch of 2 is a single-process micro-batch of 2; with EP = 2 the layer sees both ranks'
micro-batches at once, which is a single-process micro-batch of 4. A wrong gradient scale (expert or aux) shows as a
loss difference of order 1e-2 after a step; reduction order gives below 1e-5.
"""

from __future__ import annotations

import pytest

from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train.trainer import train
from tests.train.synthetic import BUILDERS, small_config

RTOL = 2e-5


def _case(tmp_path, name: str, *overrides: str, resume=None):
    cfg = small_config(
        tmp_path / name,
        "train.max_steps=6",
        "train.save_interval=2",
        "train.eval_interval=100",
        "train.eval_at_start=false",
        *overrides,
    )
    result = train(cfg, resume=resume, data=BUILDERS)
    return [(r.step, r.loss, r.aux_loss) for r in result.history]


def _worker(rank: int, world: int, tmp_path, r4_step2: str) -> dict:
    return {
        "ddp": _case(tmp_path, "ddp", "train.exit_at_step=4"),
        "fsdp": _case(tmp_path, "fsdp", "train.exit_at_step=4", "train.dense_parallel=fsdp"),
        "ep2_allgather": _case(
            tmp_path,
            "ep2_allgather",
            "train.exit_at_step=4",
            "parallel.expert_parallel_size=2",
            "moe.dispatcher=allgather",
            resume=r4_step2,
        ),
        "ep2_alltoall": _case(
            tmp_path, "ep2_alltoall", "parallel.expert_parallel_size=2", "moe.dispatcher=alltoall", resume=r4_step2
        ),
    }


def _assert_same(got, want):
    assert [s for s, _, _ in got] == [s for s, _, _ in want]
    for (step, loss, aux), (_, ref_loss, ref_aux) in zip(got, want):
        assert loss == pytest.approx(ref_loss, rel=RTOL), step
        assert aux == pytest.approx(ref_aux, rel=RTOL), step


def test_two_ranks_match_one_and_checkpoints_move_between_layouts(tmp_path):
    r2 = _case(tmp_path, "r2")  # micro-batches of 2 sequences
    r4 = _case(tmp_path, "r4", "train.micro_batch_size=4")  # micro-batches of 4
    r4_step2 = str(tmp_path / "r4" / "run" / "checkpoints" / "step_00000002")

    results = run_distributed(2, _worker, tmp_path, r4_step2)
    assert results[0] == results[1]  # every rank reports the global loss
    got = results[0]
    _assert_same(got["ddp"], r2[:4])
    _assert_same(got["fsdp"], r2[:4])
    _assert_same(got["ep2_allgather"], r4[2:4])  # EP 1 checkpoint loaded with EP 2
    _assert_same(got["ep2_alltoall"], r4[2:])

    # back to one process: from the EP 2 checkpoint and from the FSDP2 (sharded dense weights) checkpoint
    ep2_step4 = tmp_path / "ep2_allgather" / "run" / "checkpoints" / "step_00000004"
    _assert_same(_case(tmp_path, "from_ep2", "train.micro_batch_size=4", resume=str(ep2_step4)), r4[4:])
    fsdp_step4 = tmp_path / "fsdp" / "run" / "checkpoints" / "step_00000004"
    _assert_same(_case(tmp_path, "from_fsdp", resume=str(fsdp_step4)), r2[4:])
    # and the losses do move: the comparison above is not between constants
    assert r4[-1][1] < r4[0][1]
