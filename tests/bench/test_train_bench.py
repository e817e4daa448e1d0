"""`aoe-ep bench train` runs end to end on the tiny model; its speeds are measured, so only their form is checked,
and its memory, which is exact, against the checkpointing modes' order."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.bench import train as bench_train


def test_tiny_model_side_by_side(monkeypatch):
    monkeypatch.setitem(bench_train.SHAPES, "tiny (AoE)", (2, 32))
    rows = bench_train.bench_model("tiny (AoE)", 1, torch.device("cpu"), contenders=("none", "selective", "full"))
    by = {r.contender: r for r in rows}
    assert by["none"].memory_vs_none == 1.0 and by["none"].speed_vs_none == 1.0
    assert by["full"].kept_bytes < by["selective"].kept_bytes < by["none"].kept_bytes
    assert by["full"].memory_vs_none < 0.3
    assert by["selective"].memory_vs_none <= 0.6  # the experts' pre-activations are recomputed
    assert all(r.tokens_per_s > 0 for r in rows)
    lines = bench_train.table(rows).splitlines()
    assert lines[0].split()[:2] == ["model", "contender"] and len(lines) == 4


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="^--models: 'huge'"):
        bench_train.main(["huge"], 1, "cpu", None)
