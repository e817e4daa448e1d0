"""The non-finite step guard on 2 gloo ranks (EP = 2): NaN produced on one rank only makes every rank skip the same
steps, the parameters stay as they were, and `train.max_bad_steps` bad steps in a row stop every rank with the same
error naming the step and the layers, with the last good checkpoint left in place and loadable."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.config import ConfigError
from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train import checkpoint as ckpt
from aoe_ep.train.guards import TrainingError
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config


def _poison(trainer: Trainer, module, steps: set[int], rank: int, on_rank: int) -> None:
    """Make `module`'s output NaN on `on_rank` during the given (1-based) steps."""

    def hook(mod, args, output):
        if rank == on_rank and trainer.step + 1 in steps and trainer.dp.module.training:
            return output * float("nan")
        return output

    module.register_forward_hook(hook)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.dp.model.state_dict().items()}


def _skip(rank: int, tmp_path, where: str) -> dict:
    cfg = small_config(
        tmp_path / where,
        "parallel.expert_parallel_size=2",
        "train.max_steps=4",
        "train.max_bad_steps=2",
        "train.eval_at_start=false",
        "train.eval_interval=100",
        "train.save_interval=100",
    )
    with Trainer(cfg, data=BUILDERS) as trainer:
        model = trainer.dp.model
        target = model.head if where == "head" else model.blocks[0].attn
        _poison(trainer, target, {3}, rank, on_rank=1)
        snapshots = {}

        def snap(mod, args):
            snapshots[trainer.step] = _params(trainer)  # the parameters at the start of step trainer.step + 1

        model.register_forward_pre_hook(snap)
        result = trainer.fit()
        final = _params(trainer)
    return {
        "history": [(r.step, r.skipped, r.loss) for r in result.history],
        "before3": snapshots[2],
        "after3": snapshots[3],
        "final": final,
    }


def _stop(rank: int, tmp_path) -> str:
    cfg = small_config(
        tmp_path / "stop",
        "parallel.expert_parallel_size=2",
        "train.max_steps=8",
        "train.max_bad_steps=2",
        "train.eval_at_start=false",
        "train.eval_interval=100",
        "train.save_interval=2",
    )
    with Trainer(cfg, data=BUILDERS) as trainer:
        _poison(trainer, trainer.dp.model.blocks[0].attn, set(range(5, 9)), rank, on_rank=0)
        with pytest.raises(TrainingError) as err:
            trainer.fit()
        assert trainer.step == 6
    # the last good checkpoint (step 4) is what `latest` names, and it loads
    with Trainer(
        small_config(tmp_path / "stop", "parallel.expert_parallel_size=2", "train.max_steps=8"),
        resume="latest",
        data=BUILDERS,
    ) as resumed:
        assert resumed.step == 4 and resumed.bad_steps.skipped == 0
    return str(err.value)


def _worker(rank: int, world: int, tmp_path) -> dict:
    return {
        "head": _skip(rank, tmp_path, "head"),
        "moe_input": _skip(rank, tmp_path, "moe_input"),
        "stop": _stop(rank, tmp_path),
    }


def test_nan_on_one_rank_skips_or_stops_every_rank_together(tmp_path):
    """One spawn for all cases: NaN logits (a non-finite loss) and NaN reaching the MoE layer, each on one rank
    at step 3, are skipped by both ranks; NaN from step 5 on stops both at step 6 with the same error."""
    results = run_distributed(2, _worker, tmp_path)
    for where in ("head", "moe_input"):
        runs = [r[where] for r in results]
        for r in runs:
            assert [(step, skipped) for step, skipped, _ in r["history"]] == [
                (1, False),
                (2, False),
                (3, True),
                (4, False),
            ], where
        assert [loss for _, _, loss in runs[0]["history"]] == pytest.approx(
            [loss for _, _, loss in runs[1]["history"]], nan_ok=True
        )
        for r in runs:  # nothing lost: the skipped step left every parameter as it was, and training went on
            for name, value in r["before3"].items():
                assert torch.equal(value, r["after3"][name]), (where, name)
            assert all(torch.isfinite(v).all() for v in r["final"].values())
            assert any(not torch.equal(v, r["after3"][k]) for k, v in r["final"].items())

    messages = [r["stop"] for r in results]
    assert messages[0] == messages[1]
    message = messages[0]
    assert message.startswith("step 6: 2 steps in a row with a non-finite loss or gradient norm (train.max_bad_steps=2")
    assert "non-finite values in MoE layer 0 (" in message
    root = tmp_path / "stop" / "run" / "checkpoints"
    assert str(root / "step_00000004") in message
    assert ckpt.latest_checkpoint(root).name == "step_00000004"
    assert not (root / "step_00000006").exists()


def test_max_bad_steps_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.max_bad_steps: must be a positive integer, got 0"):
        small_config(tmp_path, "train.max_bad_steps=0")
