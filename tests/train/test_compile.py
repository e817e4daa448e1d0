"""train.compile: compiled blocks train like eager ones, and a machine that cannot compile is told so at start-up."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.config import ConfigError
from aoe_ep.train import compile as compile_module
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config


def _losses(tmp_path, *overrides: str) -> list[float]:
    """Each step's loss and aux loss, in turn (flat: `pytest.approx` compares nested tuples exactly)."""
    cfg = small_config(
        tmp_path,
        "model.n_layers=2",
        "train.max_steps=3",
        "train.eval_at_start=false",
        "train.eval_interval=100",
        "train.save_interval=100",
        *overrides,
    )
    with Trainer(cfg, data=BUILDERS) as trainer:
        methods = compile_module.compiled_methods(trainer.dp.model)
        # two blocks: each block's norms and attention (`mix`) and its MoE layer's gating
        assert [name for _, name in methods] == ["mix", "gate"] * 2
        assert [compile_module.is_compiled(*m) for m in methods] == [cfg.train.compile] * 4
        return [value for r in trainer.fit().history for value in (r.loss, r.aux_loss)]


def test_compiled_blocks_train_like_eager(tmp_path):
    """The tiny AoE model, with full checkpointing around the compiled pieces: losses within fp32 tolerance."""
    torch._dynamo.reset()
    eager = _losses(tmp_path / "eager", "train.activation_checkpointing=full")
    compiled = _losses(tmp_path / "compiled", "train.activation_checkpointing=full", "train.compile=true")
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_a_machine_that_cannot_compile_stops_at_start_up(tmp_path, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(compile_module.torch, "compile", no_compiler)
    cfg = small_config(tmp_path, "train.compile=true")
    with pytest.raises(ConfigError, match=r"^train.compile: this machine cannot compile for cpu \(OSError: no C\+\+"):
        Trainer(cfg, data=BUILDERS)
