"""The layer benchmark runs end to end on a tiny case; its ratios are measured, so only their form is checked."""

import torch
import yaml

from aoe_ep.bench.layer import main
from aoe_ep.bench.measure import saved_bytes_counter
from aoe_ep.moe.cost import dense_flops, moe_flops
from aoe_ep.config import MoEConfig


def test_cost_model_matches_design_ratios():
    # DESIGN.md section 6: AoE/MoE FLOP ratio 0.923 with d_low=256 and 0.979 with d_low=64 (d=768, 8 experts, top-2)
    moe = moe_flops(MoEConfig(d_model=768, scorer="router", d_ffn=3072))
    for d_low, ratio in ((256, 0.923), (64, 0.979)):
        aoe = moe_flops(MoEConfig(d_model=768, scorer="aoe", d_ffn=3072, d_low=d_low))
        assert abs(moe / aoe - ratio) < 1.5e-3
    assert dense_flops(768, 3072) == 6 * 768 * 3072


def test_saved_bytes_counts_activations_not_parameters():
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(4, 8)
    with saved_bytes_counter(exclude=[w]) as saved:
        y = torch.tanh(x @ w)  # saves x (for w's grad) and tanh's output
    assert saved[0] == x.numel() * 4 + y.numel() * 4


def test_bench_layer_runs_tiny_case(tmp_path, capsys):
    cases = tmp_path / "cases.yaml"
    cases.write_text(yaml.safe_dump({"tokens": 32, "cases": [
        {"name": "tiny", "d_model": 16, "d_ffn": 16, "d_low": 8, "num_experts": 4, "top_k": 2}]}))
    results = main(str(cases), None, iters=1, rounds=1, device="cpu", dtype="float32", out=str(tmp_path / "r.json"))
    out = capsys.readouterr().out
    assert "aoe/moe" in out and "aoe/dense" in out and "efficiency" in out
    (r,) = results
    assert r["params"]["aoe"] == r["params"]["moe"] - 4 * 16  # Eq. 5 equalises experts; MoE adds its router
    assert all(q["measured"] > 0 and q["bound"] > 0 for q in r["ratios"])
    assert r["memory"]["aoe"]["saved_bytes"] > 0
    assert (tmp_path / "r.json").exists()
