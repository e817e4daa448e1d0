"""Activation checkpointing through the trainer's own entry points composes with what a real run uses: a stopped
and resumed run, gradient accumulation, the non-finite step guard, bf16 autocast, and DDP with expert parallelism
on 2 gloo ranks. Checkpointing recomputes the same operators on the same inputs under the same autocast state, so on
the CPU the losses, gradient norms, parameters and logged statistics equal the plain run's bit for bit, in fp32 and
in bf16 alike; the logged statistics and bytes per step show that a recompute is not counted again.

Covered in test_activation_checkpoint.py: the layer-level equality under every scorer and dispatcher, the trainer
with two micro-batches per step, and FSDP2 with EP 2 on 2 ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train.activation_checkpoint import checkpoint_entries
from aoe_ep.train.guards import TrainingError
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config

# Two blocks, so that `ac_every=2` leaves one of them plain; 64-token steps in two micro-batches (gradient
# accumulation); one log record, at the last step, whose window covers every step.
BASE = (
    "model.n_layers=2",
    "train.eval_at_start=false",
    "train.eval_interval=100",
    "train.save_interval=100",
    "train.log_interval=100",
)
TIMINGS = ("perf/", "moe/seconds/", "moe/idle_time")


def _ac(mode: str, every: int = 1) -> tuple[str, ...]:
    return (f"train.activation_checkpointing={mode}", f"train.ac_every={every}")


def _logged(cfg) -> list[dict]:
    """The training records of the run's log without their timings: the load statistics and, under expert
    parallelism, the bytes per step of each collective."""
    lines = (Path(cfg.train.out_dir) / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [{k: v for k, v in r.items() if not k.startswith(TIMINGS)} for r in records if "train/loss" in r]


def _run(cfg, resume=None) -> dict:
    """Train `cfg`: per step (step, loss, aux loss, gradient norm, lr, skipped), the final parameters and buffers,
    whether any block was checkpointed, and what rank 0 logged."""
    with Trainer(cfg, resume=resume, data=BUILDERS) as trainer:
        result = trainer.fit()
        run = {
            "history": [(r.step, r.loss, r.aux_loss, r.grad_norm, r.lr, r.skipped) for r in result.history],
            "state": {k: v.detach().clone() for k, v in trainer.dp.model.state_dict().items()},
            "checkpointed": bool(checkpoint_entries(trainer.dp.model)),
            "main": trainer.runtime.is_main,
        }
    run["log"] = _logged(cfg) if run["main"] else None
    return run


def _assert_same_run(got: dict, want: dict, where: str) -> None:
    assert got["history"] == want["history"], where
    assert got["state"].keys() == want["state"].keys(), where
    for name, value in want["state"].items():
        assert torch.equal(got["state"][name], value), f"{where}: {name}"


def _resumed(path, *overrides: str, stop: int, plain_then: tuple[str, ...] = ()) -> dict:
    """A run stopped after step `stop` and resumed from its latest checkpoint (with `plain_then` added on resume):
    the two halves' history joined, the resumed half's parameters."""
    first = _run(small_config(path, *overrides, f"train.exit_at_step={stop}"))
    second = _run(small_config(path, *overrides, *plain_then), resume="latest")
    assert first["history"][-1][0] == stop and second["history"][0][0] == stop + 1
    return {**second, "history": first["history"] + second["history"]}


def test_stopped_and_resumed_checkpointed_runs_equal_the_plain_run(tmp_path):
    """AoE: `full` on every block and `selective` on every other block, each stopped after step 2 and resumed, and
    the plain run's checkpoint resumed with `full` on, all equal the uninterrupted plain run bit for bit (which the
    uninterrupted checkpointed runs equal: test_activation_checkpoint.py, and the tests below)."""
    extra = BASE + ("train.max_steps=4",)
    plain = _run(small_config(tmp_path / "plain", *extra))
    assert not plain["checkpointed"]
    assert plain["history"][-1][1] < plain["history"][0][1]  # it trains: the comparisons are not of constants
    for mode, every in (("full", 1), ("selective", 2)):
        got = _resumed(tmp_path / f"{mode}_split", *extra, *_ac(mode, every), stop=2)
        assert got["checkpointed"], mode
        _assert_same_run(got, plain, f"{mode}, resumed")
    got = _resumed(tmp_path / "switched", *extra, stop=2, plain_then=_ac("full"))
    assert got["checkpointed"]
    _assert_same_run(got, plain, "full switched on at the resume")


def test_resumed_checkpointed_run_with_bias_balancing_and_erc(tmp_path):
    """The routed MoE with the bias balancer (a buffer moved by each step's global expert counts, which `full`'s
    recompute reads) and the ERC loss, stopped under `full` and resumed: the plain run, bit for bit."""
    extra = BASE + (
        "train.max_steps=4",
        "moe.scorer=router",
        "moe.balance=bias",
        "moe.erc_loss_coeff=1.0",
        "moe.erc_alpha=0.5",
    )
    plain = _run(small_config(tmp_path / "plain", *extra))
    got = _resumed(tmp_path / "full", *extra, *_ac("full"), stop=2)
    _assert_same_run(got, plain, "router, bias, erc")
    assert any(name.endswith("expert_bias") and v.abs().sum() > 0 for name, v in plain["state"].items())


def _poison(trainer: Trainer, module, steps: set[int], on_rank: int) -> None:
    """Make `module`'s output NaN on `on_rank` in the given (1-based) training steps; a recompute inside backward
    (same step, training mode) is poisoned alike, as a real fault of the forward would be."""

    def hook(mod, args, output):
        if trainer.runtime.rank == on_rank and trainer.step + 1 in steps and trainer.dp.module.training:
            return output * float("nan")
        return output

    module.register_forward_hook(hook)


def _skipped(path, mode: str, *overrides: str, on_rank: int = 0) -> dict:
    """NaN out of the first block's attention (the MoE layer's input) in step 2 of 3: the step is skipped on every
    rank, the parameters stay as they were, and training goes on."""
    cfg = small_config(path, *BASE, "train.max_steps=3", *overrides, *_ac(mode))
    with Trainer(cfg, data=BUILDERS) as trainer:
        model = trainer.dp.model
        _poison(trainer, model.blocks[0].attn, {2}, on_rank)
        snapshots = {}

        def snap(mod, args):
            if trainer.step not in snapshots:  # the parameters at the start of step trainer.step + 1
                snapshots[trainer.step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        model.register_forward_pre_hook(snap)
        result = trainer.fit()
        main = trainer.runtime.is_main
        return {
            "good": [(r.step, r.loss, r.aux_loss, r.grad_norm) for r in result.history if not r.skipped],
            "skipped": [r.step for r in result.history if r.skipped],
            "kept": all(torch.equal(v, snapshots[2][k]) for k, v in snapshots[1].items()),
            "log": _logged(cfg) if main else None,
        }


def _stopped(path, mode: str) -> str:
    """NaN from step 2 on with train.max_bad_steps=2: the run stops at step 3; the error message."""
    cfg = small_config(path, *BASE, "train.max_steps=5", "train.max_bad_steps=2", *_ac(mode))
    with Trainer(cfg, data=BUILDERS) as trainer:
        _poison(trainer, trainer.dp.model.blocks[0].attn, set(range(2, 6)), on_rank=0)
        with pytest.raises(TrainingError) as err:
            trainer.fit()
        assert trainer.step == 3, mode
    return str(err.value)


def test_the_non_finite_guard_behaves_alike_under_checkpointing(tmp_path):
    """NaN reaching the MoE layers in step 2 is skipped alike with and without checkpointing, with the same logged
    statistics (the recompute's counts are not added); NaN from step 2 on stops every mode at step 3 with the same
    error, whose count of non-finite inputs per layer is the forward's, not doubled by the recompute."""
    plain = _skipped(tmp_path / "skip_none", "none")
    assert plain["skipped"] == [2] and [g[0] for g in plain["good"]] == [1, 3] and plain["kept"]
    message = _stopped(tmp_path / "stop_none", "none")
    assert message.startswith("step 3: 2 steps in a row")
    assert "non-finite values in MoE layer 0 (2048 " in message  # 2 micro-batches x 2 x 16 tokens x 32 features
    for mode in ("full", "selective"):
        got = _skipped(tmp_path / f"skip_{mode}", mode)
        assert got["skipped"] == [2] and got["kept"], mode
        assert got["good"] == plain["good"] and got["log"] == plain["log"], mode
        stopped = _stopped(tmp_path / f"stop_{mode}", mode)
        assert stopped.replace(f"stop_{mode}", "stop_none") == message, mode


def test_bf16_autocast_checkpointed_equals_plain(tmp_path):
    """Under bf16 autocast the recompute replays the forward's bf16 kernels on the same inputs (checkpoint restores
    the autocast state), so the losses are equal, not merely close. That autocast was on: the fp32 run differs, by
    no more than bf16's rounding allows (unit roundoff 2^-8 = 0.4% per rounding, a few roundings deep in two blocks
    and two steps: 3%)."""
    extra = BASE + ("train.max_steps=2",)
    runs = {
        mode: _run(small_config(tmp_path / mode, *extra, "train.precision=bf16", *_ac(mode)))
        for mode in ("none", "full", "selective")
    }
    for mode in ("full", "selective"):
        _assert_same_run(runs[mode], runs["none"], f"bf16 {mode}")
    fp32 = _run(small_config(tmp_path / "fp32", *extra, "train.precision=fp32"))["history"]
    bf16_losses, fp32_losses = [h[1] for h in runs["none"]["history"]], [h[1] for h in fp32]
    assert bf16_losses != fp32_losses
    assert bf16_losses == pytest.approx(fp32_losses, rel=3e-2)


EP2_DDP = ("parallel.expert_parallel_size=2", "moe.dispatcher=alltoall", "train.dense_parallel=ddp")


def _ddp_worker(rank: int, world: int, tmp_path) -> dict:
    """DDP for the dense weights and EP 2 with all-to-all for the experts: each mode's run, and the guard's skip of
    a NaN on rank 1 only."""
    out = {}
    for mode in ("none", "full", "selective"):
        out[mode] = _run(small_config(tmp_path / mode, *BASE, *EP2_DDP, "train.max_steps=3", *_ac(mode)))
        out[f"skip_{mode}"] = _skipped(tmp_path / f"skip_{mode}", mode, *EP2_DDP, on_rank=1)
    return out


def test_checkpointing_under_ddp_and_expert_parallelism(tmp_path):
    """Every rank's run under `full` and `selective` equals its plain run bit for bit (a sum of two ranks'
    gradients is the same in either order), with the same logged statistics and bytes per collective; a NaN on one
    rank is skipped alike by both ranks in every mode."""
    results = run_distributed(2, _ddp_worker, tmp_path)
    log = results[0]["none"]["log"]
    assert any(k.startswith("moe/bytes_per_step/") and v > 0 for k, v in log[0].items())
    assert "moe/layer00/tokens_per_expert" in log[0]
    for rank, got in enumerate(results):
        assert got["none"]["history"][-1][1] < got["none"]["history"][0][1]
        for mode in ("full", "selective"):
            assert got[mode]["checkpointed"]
            _assert_same_run(got[mode], got["none"], f"rank {rank}/{mode}")
            assert got[mode]["log"] == got["none"]["log"], f"rank {rank}/{mode}"
            skip, plain = got[f"skip_{mode}"], got["skip_none"]
            assert skip["skipped"] == [2] and skip["kept"], f"rank {rank}/{mode}"
            assert skip["good"] == plain["good"] and skip["log"] == plain["log"], f"rank {rank}/{mode}"
    assert results[0]["none"]["history"] == results[1]["none"]["history"]  # the global loss on every rank
