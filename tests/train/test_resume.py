"""`--resume` continues exactly: stop after N steps, resume from the checkpoint, and every loss, gradient norm,
validation loss, parameter and optimizer moment equals the uninterrupted run's, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config


def _run(cfg, resume=None):
    with Trainer(cfg, resume=resume, data=BUILDERS) as trainer:
        result = trainer.fit()
        params = {k: v.detach().clone() for k, v in trainer.dp.model.state_dict().items()}
        moments = [
            {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
            for group in trainer.optimizer.param_groups
            for p in group["params"]
        ]
        lr = trainer.optimizer.param_groups[0]["lr"]
    return result, params, moments, lr


# The routed MoE with the ERC loss: its noise is drawn per step, so a resume must redraw the same stream.
ERC = ("moe.scorer=router", "moe.erc_loss_coeff=1.0", "moe.erc_alpha=0.5")


@pytest.mark.parametrize("extra", [(), ERC], ids=["aoe", "router_erc"])
def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, extra):
    full, full_params, full_moments, full_lr = _run(small_config(tmp_path / "full", "train.max_steps=6", *extra))

    interrupted = small_config(tmp_path / "split", "train.max_steps=6", "train.exit_at_step=3", *extra)
    first, _, _, _ = _run(interrupted)
    assert first.step == 3 and first.checkpoint.name == "step_00000003"
    second, params, moments, lr = _run(small_config(tmp_path / "split", "train.max_steps=6", *extra), resume="latest")

    assert [r.step for r in first.history + second.history] == list(range(1, 7))
    for a, b in zip(full.history, first.history + second.history):
        assert (a.loss, a.aux_loss, a.grad_norm, a.lr) == (b.loss, b.aux_loss, b.grad_norm, b.lr)
    assert full.evals[-1] == second.evals[-1]
    assert full_lr == lr
    assert full_params.keys() == params.keys()
    for name in params:
        assert torch.equal(full_params[name], params[name]), name
    for a, b in zip(full_moments, moments):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # and the run really trained: loss fell and the resumed half did not restart from step 0
    assert full.history[-1].loss < full.history[0].loss
    assert second.history[0].step == 4
    if extra:  # the ERC loss and ε are logged per layer, and the resumed half logs the same values

        def erc_log(run):
            records = [json.loads(line) for line in (tmp_path / run / "run" / "log.jsonl").read_text().splitlines()]
            return {
                r["step"]: (r["moe/layer00/erc_loss"], r["moe/layer00/erc_eps"])
                for r in records
                if "moe/layer00/erc_loss" in r
            }

        full_log, split_log = erc_log("full"), erc_log("split")
        assert sorted(full_log) == list(range(1, 7)) and full_log == split_log
        assert all(loss > 0 and 0 < eps < 1 for loss, eps in full_log.values())
