"""EP = 8 on 8 gloo processes, in one spawn (8 processes on a 2-core machine: spawning is the slow part):

- both dispatchers with 16 experts (2 per rank), uneven token counts and a rank with none, equal the single-device
  layer in outputs, aux loss, statistics and every gradient, and their byte counters equal the communication model
  (the checks of test_dispatchers.py);
- a 16-expert model trains through the trainer at EP = 8 x DP = 1 (`alltoall`; the trainer's `allgather` path is
  the one of EP 2 and 4 in tests/train/test_layouts.py), step by step with the losses of one process whose
  micro-batch holds all 8 ranks' sequences.
"""

from __future__ import annotations

import itertools
import math

import pytest

from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train.trainer import train
from tests.parallel.test_dispatchers import RTOL, _check_layout
from tests.train.synthetic import BUILDERS, small_config

WORLD = 8
CASES = [
    dict(scorer=s, selection=sel, dispatcher=disp, num_experts=16, gate=gate)
    for (s, sel, gate), disp in itertools.product(
        (
            ("aoe", "top_k", "softmax_topk"),
            ("router", "top_p", "softmax_all"),
            ("self_routing", "expert_choice", "softmax_topk"),
        ),
        ("allgather", "alltoall"),
    )
]
CASES += [
    dict(scorer="router", selection="top_k", dispatcher=disp, num_experts=16, expert_kind="factorized")
    for disp in ("allgather", "alltoall")
]
SIZES = [0] + [3 + r for r in range(1, WORLD)]  # uneven, and rank 0 holds no tokens
TRAIN_RTOL = 2e-5


def _config(tmp_path, name: str, *overrides: str):
    return small_config(
        tmp_path / name,
        "moe.num_experts=16",
        "train.max_steps=4",
        "train.global_batch_tokens=128",
        "train.eval_interval=100",
        "train.save_interval=100",
        "train.eval_at_start=false",
        *overrides,
    )


def _losses(cfg) -> list[tuple[float, float]]:
    return [(r.loss, r.aux_loss) for r in train(cfg, data=BUILDERS).history]


def _worker(rank: int, world: int, tmp_path) -> dict:
    layer = _check_layout(rank, world, world, CASES, SIZES)
    trained = {
        "alltoall": _losses(
            _config(
                tmp_path,
                "alltoall",
                "train.micro_batch_size=1",
                "moe.dispatcher=alltoall",
                f"parallel.expert_parallel_size={world}",
            )
        )
    }
    return {"layer": layer, "trained": trained}


@pytest.fixture(scope="module")
def ep8(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ep8")
    return tmp_path, run_distributed(WORLD, _worker, tmp_path)


def test_both_dispatchers_at_ep8_match_the_single_device_layer(ep8):
    _, per_rank = ep8
    failures = []
    for rank, results in enumerate(per_rank):
        for i, case in enumerate(CASES):
            for quantity, rel in results["layer"][i]["err"].items():
                if not rel <= RTOL:
                    failures.append(f"rank {rank} {case}: {quantity} relative error {rel:.2e}")
            if results["layer"][i]["bytes"] != results["layer"][i]["model"]:
                failures.append(
                    f"rank {rank} {case}: bytes {results['layer'][i]['bytes']} != model {results['layer'][i]['model']}"
                )
    assert not failures, "\n".join(failures)
    assert any(per_rank[1]["layer"][i]["bytes"] for i in range(len(CASES)))  # tokens did travel


def test_a_16_expert_model_trains_at_ep8(ep8):
    tmp_path, per_rank = ep8
    reference = _losses(_config(tmp_path, "single", "train.micro_batch_size=8"))
    assert all(math.isfinite(loss) for loss, _ in reference) and reference[-1][0] < reference[0][0]
    for rank, results in enumerate(per_rank):
        for disp, losses in results["trained"].items():
            assert len(losses) == len(reference) == 4
            for step, ((loss, aux), (ref_loss, ref_aux)) in enumerate(zip(losses, reference), start=1):
                assert loss == pytest.approx(ref_loss, rel=TRAIN_RTOL), f"rank {rank} {disp} step {step}"
                assert aux == pytest.approx(ref_aux, rel=TRAIN_RTOL), f"rank {rank} {disp} step {step}"
