"""`aoe-ep toy` (Appendix B) on a reduced size: stage one reproduces the paper's contrast (the router sends the two
classes to different experts, AoE lets one expert take both), the figures and data are written."""

from __future__ import annotations

import json

import pytest

from aoe_ep.analysis.toy import ToyConfig, summarize, train_toy
from aoe_ep.cli import main

pytest.importorskip("matplotlib")


def test_stage_one_separates_classes_in_moe_and_not_in_aoe():
    cfg = ToyConfig(dim=8, stage1_steps=120, stage2_steps=20, eval_per_class=128)
    summary = summarize({s: train_toy(cfg, s, every=40) for s in ("aoe", "router")})
    aoe, moe = summary["aoe"]["stage1"], summary["router"]["stage1"]
    assert aoe["accuracy"] == 1.0 and moe["accuracy"] == 1.0
    # AoE: one expert holds both classes; MoE: one expert per class
    assert aoe["expert_of_class"][0] == aoe["expert_of_class"][1]
    assert min(aoe["load_per_class"][c][aoe["expert_of_class"][0]] for c in range(2)) > 0.95
    assert max(aoe["overall_load"]) > 0.95
    assert moe["expert_of_class"][0] != moe["expert_of_class"][1]
    assert min(max(row) for row in moe["load_per_class"][:2]) > 0.95
    # the busy AoE expert's activation norm on its classes exceeds the idle one's
    busy = aoe["expert_of_class"][0]
    assert aoe["score_per_class"][0][busy] > aoe["score_per_class"][0][1 - busy]


def test_toy_command_writes_figures_and_data(tmp_path, capsys):
    assert main(["toy", "--out", str(tmp_path), "--stage1-steps", "20", "--stage2-steps", "10", "--dim", "8"]) == 0
    out = capsys.readouterr().out
    assert "AoE stage1" in out and "MoE stage2" in out
    for name in ("toy_load.png", "toy_score.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "toy.json").read_text())
    assert set(data["summary"]) == {"aoe", "router"}
    assert data["traces"]["aoe"]["steps"][-1] == 30
