"""The layer benchmark runs end to end on a tiny case; its ratios are measured, so only their form is checked."""

import json

import pytest
import torch
import yaml

from aoe_ep.bench.layer import main
from aoe_ep.bench.measure import saved_bytes_counter
from aoe_ep.config import MoEConfig
from aoe_ep.moe.cost import dense_flops, moe_flops


def test_erc_flops_are_two_n_squared_d_D_per_step():
    from aoe_ep.moe.cost import erc_flops

    cfg = MoEConfig(d_model=768, num_experts=64, top_k=3, d_ffn=768, scorer="router", erc_loss_coeff=1.0)
    assert erc_flops(cfg) == 2 * 64 * 64 * 768 * 768
    assert erc_flops(MoEConfig(d_model=768, num_experts=64, d_ffn=768, scorer="router")) == 0.0
    factorised = MoEConfig(
        d_model=16,
        num_experts=4,
        d_ffn=16,
        d_low=4,
        d_wide=8,
        scorer="router",
        expert_kind="factorized",
        erc_loss_coeff=1.0,
    )
    assert erc_flops(factorised) == 2 * 16 * (16 * 4 + 4 * 8)


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
    cases.write_text(
        yaml.safe_dump(
            {
                "tokens": 32,
                "cases": [{"name": "tiny", "d_model": 16, "d_ffn": 16, "d_low": 8, "num_experts": 4, "top_k": 2}],
            }
        )
    )
    results = main(str(cases), None, iters=1, rounds=1, device="cpu", dtype="float32", out=str(tmp_path / "r.json"))
    out = capsys.readouterr().out
    assert (
        "aoe/moe" in out
        and "aoe/dense" in out
        and "threshold/aoe" in out
        and "moe_erc/moe" in out
        and "efficiency" in out
    )
    (r,) = results
    assert r["params"]["aoe"] == r["params"]["moe"] - 4 * 16  # Eq. 5 equalises experts; MoE adds its router
    assert all(q["measured"] > 0 and q["bound"] > 0 for q in r["ratios"])
    assert all(q["round_range"][0] <= q["measured"] <= q["round_range"][1] for q in r["ratios"])
    assert r["memory"]["aoe"]["saved_bytes"] > 0
    assert (tmp_path / "r.json").exists()


def test_bench_layer_contenders_skew_and_model_cases(tmp_path, capsys):
    cases = tmp_path / "cases.yaml"
    tiny = {"d_model": 16, "d_ffn": 16, "d_low": 8, "num_experts": 4, "top_k": 2}
    cases.write_text(
        yaml.safe_dump(
            {
                "tokens": 32,
                "cases": [
                    {"name": "skewed", "tokens": 48, "skew": "hot_expert", **tiny},
                    {"name": "slice", "model": {"n_layers": 2, "n_heads": 2, "vocab_size": 50, "seq_len": 16}, **tiny},
                ],
            }
        )
    )
    out = tmp_path / "r.json"
    skewed, model = main(str(cases), None, iters=1, rounds=1, device="cpu", dtype="float32", out=str(out))
    assert skewed["tokens"] == 48 and model["tokens"] == 32  # a case's own `tokens` wins over the file's
    pairs = {q["pair"]: q for q in skewed["ratios"]}
    assert {"moe/experts", "aoe_recompute/aoe", "aoe/loop_reference", "moe_skewed/moe", "aoe_skewed/aoe"} <= set(pairs)
    assert any(p.startswith("experts_") for p in pairs)
    # the skew comes from the inputs: the hot expert really gets about half of the routed rows
    assert all(share >= 0.45 for share in skewed["skew"]["hot_expert_share"].values())
    # recompute keeps less than keep, whatever the speed; the whole-model case measures the same four kinds
    assert skewed["memory"]["aoe_recompute"]["saved_bytes"] < skewed["memory"]["aoe"]["saved_bytes"]
    assert set(model["memory"]) == {"dense", "moe", "aoe", "aoe_recompute"}
    assert model["memory"]["aoe_recompute"]["saved_bytes"] < model["memory"]["aoe"]["saved_bytes"]
    assert skewed["environment"]["allocator"] and "hot expert" in capsys.readouterr().out
    assert len(json.loads(out.read_text())) == 2


def test_loop_reference_is_the_same_layer_as_aoe():
    # the obvious implementation, with the package layer's weights, computes the same outputs and aux loss
    from aoe_ep.bench.reference import LoopAoE
    from aoe_ep.moe import MoELayer

    cfg = MoEConfig(d_model=16, scorer="aoe", num_experts=4, top_k=2, d_ffn=16, d_low=8)
    layer, ref = MoELayer(cfg).double(), LoopAoE(cfg).double()
    with torch.no_grad():
        for i in range(cfg.num_experts):
            ref.down[i].weight.copy_(layer.scorer.w_down[i].t())
            ref.up[i].weight.copy_(layer.experts.w_up[i].t())
            ref.proj[i].weight.copy_(layer.experts.w_p[i].t())
            ref.out[i].weight.copy_(layer.experts.w_o[i].t())
    x = torch.randn(20, 16, dtype=torch.float64)
    (y, info), (y_ref, info_ref) = layer(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(info.aux_loss, info_ref.aux_loss)


def _loop_copy(layer, cfg):
    from aoe_ep.bench.reference import LoopAoE

    ref = LoopAoE(cfg).double()
    with torch.no_grad():
        for i in range(cfg.num_experts):
            ref.down[i].weight.copy_(layer.scorer.w_down[i].t())
            ref.up[i].weight.copy_(layer.experts.w_up[i].t())
            ref.proj[i].weight.copy_(layer.experts.w_p[i].t())
            ref.out[i].weight.copy_(layer.experts.w_o[i].t())
    return ref


@pytest.mark.parametrize("top_k", [1, 3])
def test_loop_reference_breaks_ties_as_the_layer_does(top_k):
    # twin experts: Wdown_1 = -Wdown_0 and Wdown_3 = -Wdown_2 score exactly alike on every token (‖-C‖ = ‖C‖, exact
    # in float64 with x and Wdown on multiples of 1/64) but compute different outputs; top-1 and top-3 split a pair
    # of twins on every token, and the lower index wins
    from aoe_ep.moe import MoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, scorer="aoe", num_experts=4, top_k=top_k, d_ffn=16, d_low=8)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        w_down = layer.scorer.w_down
        w_down.copy_(torch.round(w_down * 64) / 64)
        w_down[1::2] = -w_down[0::2]
    ref = _loop_copy(layer, cfg)
    x = torch.round(torch.randn(40, 16, dtype=torch.float64) * 64) / 64
    (y, info), (y_ref, info_ref) = layer(x), ref(x)
    counts = info.stats.tokens_per_expert.tolist()
    if top_k == 1:
        assert counts[1] == counts[3] == 0 and counts[0] > 0 and counts[2] > 0, counts
    else:
        assert counts[0] == counts[2] == 40 and counts[1] + counts[3] == 40 and 0 < counts[1] < 40, counts
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(info.aux_loss, info_ref.aux_loss)


def test_paired_speedup_is_the_median_of_per_round_ratios():
    from aoe_ep.bench.measure import paired_speedup

    # the machine halves its speed in round 2: both steps slow down together, their ratio does not move
    samples = {"fast": [1.0, 2.0, 1.0, 1.1], "slow": [2.0, 4.0, 2.0, 2.0]}
    median, low, high = paired_speedup(samples, "fast", "slow")
    assert median == pytest.approx(2.0) and low == pytest.approx(2.0 / 1.1) and high == pytest.approx(2.0)


def test_calibrated_threshold_fires_each_expert_on_its_share_of_tokens():
    from aoe_ep.bench.layer import calibrate_threshold
    from aoe_ep.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(d_model=16, num_experts=4, d_ffn=16, d_low=8, selection="threshold", threshold_density=0.5)
    )
    x = torch.randn(64, 16)
    calibrate_threshold(layer, x)
    counts = layer(x)[1].stats.tokens_per_expert
    assert counts.tolist() == [32, 32, 32, 32]  # 64 tokens x density 0.5, each expert alike
