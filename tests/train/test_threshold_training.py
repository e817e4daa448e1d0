"""Threshold selection in training (configs/tiny_threshold.yaml, shrunk): λ moves after every applied step by the
step's global density, is logged with the density, survives checkpoints (a resumed run equals the uninterrupted one
bit for bit, λ and b included), and at EP 2 on 2 gloo ranks (both dispatchers; DDP and FSDP2) it is the same on
every rank and equal to one process's."""

from __future__ import annotations

import json

import pytest
import torch

from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import run_recording, small_config

THRESHOLD = ("model.n_layers=2", "moe.threshold_lambda_init=0.01", "moe.threshold_eta=0.5")
LEAN = ("train.max_steps=4", "train.save_interval=4", "train.eval_interval=100", "train.eval_at_start=false")
# FSDP2 and the EP dispatchers sum gradients in another order; AdamW's normalisation turns those roundoff
# differences into whole steps on near-zero gradient entries, so four steps drift by up to ~2e-5 in the loss.
RTOL = 1e-4


def _lambdas(trainer: Trainer) -> list[float]:
    return [float(layer.threshold_lambda) for layer in trainer.moe_layers]


def _run(cfg, resume=None) -> dict:
    return run_recording(cfg, _lambdas, "lambdas", resume)


def _config(path, *overrides):
    return small_config(path, *THRESHOLD, *overrides, preset="tiny_threshold")


def test_lambda_moves_is_logged_and_resumes_bit_identically(tmp_path):
    full = _run(_config(tmp_path / "full"))
    first = _run(_config(tmp_path / "split", "train.exit_at_step=3"))
    second = _run(_config(tmp_path / "split"), resume="latest")

    assert first["lambdas"] == second["loaded"] and first["lambdas"] != [0.01, 0.01]  # λ is in the checkpoint
    for a, b in zip(full["history"], first["history"] + second["history"]):
        assert (a.loss, a.aux_loss, a.grad_norm) == (b.loss, b.aux_loss, b.grad_norm)
    assert full["evals"][-1] == second["evals"][-1]
    assert full["state"].keys() == second["state"].keys()
    assert all(torch.equal(full["state"][k], second["state"][k]) for k in full["state"])
    assert "blocks.1.ffn.threshold_lambda" in full["state"] and "blocks.1.ffn.threshold_bias" in full["state"]
    assert full["lambdas"] == second["lambdas"]

    # λ after each step from the logged density of that step (log_interval 1): ×1.5 above ρ* = 0.5, ÷1.5 below
    records = [json.loads(line) for line in (tmp_path / "full" / "run" / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if "moe/layer01/threshold_lambda" in r]
    assert len(logged) == 6
    for layer in range(2):
        lam = 0.01
        for r in logged:
            rho = r[f"moe/layer{layer:02d}/density"]
            assert 0.0 <= rho <= 1.0 and rho != 0.5
            lam = min(1.0, lam * 1.5 if rho > 0.5 else lam / 1.5)
            assert r[f"moe/layer{layer:02d}/threshold_lambda"] == pytest.approx(lam, rel=1e-6)
        assert full["lambdas"][layer] == pytest.approx(lam, rel=1e-6)
    assert all(r.aux_loss > 0 for r in full["history"])


def _worker(rank: int, world: int, tmp_path, dispatcher: str, dense: str) -> dict:
    out = _run(
        _config(
            tmp_path / dispatcher,
            *LEAN,
            "parallel.expert_parallel_size=2",
            "train.micro_batch_size=1",
            f"moe.dispatcher={dispatcher}",
            f"train.dense_parallel={dense}",
        )
    )
    return {
        "lambdas": out["lambdas"],
        "losses": [r.loss for r in out["history"]],
        "aux": [r.aux_loss for r in out["history"]],
    }


@pytest.mark.parametrize("dispatcher,dense", [("allgather", "ddp"), ("alltoall", "fsdp")])
def test_lambda_under_expert_parallelism_equals_one_device(tmp_path, dispatcher, dense):
    single = _run(_config(tmp_path / "single", *LEAN))
    per_rank = run_distributed(2, _worker, tmp_path, dispatcher, dense)
    for rank, got in enumerate(per_rank):
        assert got["losses"] == pytest.approx([r.loss for r in single["history"]], rel=RTOL), rank
        assert got["aux"] == pytest.approx([r.aux_loss for r in single["history"]], rel=RTOL), rank
        assert got["lambdas"] == single["lambdas"] == per_rank[1 - rank]["lambdas"], rank
