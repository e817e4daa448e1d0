"""`moe.balance: bias` (DeepSeek-V3's aux-loss-free balancing): the update rule against a direct computation, the
biased selection against the per-token reference (selection on s + b; gates, aux terms, statistics and gradients
from the unbiased scores), and the configuration's errors."""

from __future__ import annotations

import math

import pytest
import torch

from aoe_ep.config import ConfigError, MoEConfig, load_config
from aoe_ep.moe import MoELayer
from aoe_ep.moe.balance import bias_update, step_token_counts
from aoe_ep.moe.balancing import update_balancing
from aoe_ep.moe.selection import decide
from aoe_ep.train.balancing_log import balancing_scalars
from tests.moe.test_layer_reference import NUM_EXPERTS, SCORERS, _seed, make_cfg, run_and_compare


def _direct(bias: list[float], counts: list[int], rate: float) -> list[float]:
    mean = sum(counts) / len(counts)
    return [b + rate * ((mean > c) - (mean < c)) for b, c in zip(bias, counts)]


def test_bias_update_is_rate_times_the_sign_of_the_load_error():
    bias = torch.tensor([0.5, -0.25, 0.0, 0.125, 1.0], dtype=torch.float64)
    counts = torch.tensor([10, 2, 6, 6, 6])  # mean 6: two experts on the mean keep their bias
    got = bias_update(bias, counts, 0.01)
    assert got.dtype == bias.dtype
    assert got.tolist() == pytest.approx(_direct(bias.tolist(), counts.tolist(), 0.01), abs=1e-15)
    assert got.tolist()[2:4] == bias.tolist()[2:4]
    assert torch.equal(bias_update(bias, torch.full((5,), 7), 0.01), bias)  # balanced: nothing moves


def test_layer_biases_move_with_the_counts_of_all_micro_batches():
    cfg = MoEConfig(d_model=8, num_experts=4, top_k=1, scorer="router", d_ffn=8, balance="bias", balance_rate=0.5)
    layers = [MoELayer(cfg), MoELayer(cfg)]
    assert all(torch.equal(layer.expert_bias, torch.zeros(4)) for layer in layers)
    assert "expert_bias" in layers[0].state_dict() and "expert_bias" not in dict(layers[0].named_parameters())
    torch.manual_seed(0)
    micro = [[layer(torch.randn(6, 8))[1] for layer in layers] for _ in range(3)]
    counts_LE = step_token_counts(micro, layers, torch.device("cpu"))
    expected = [[sum(int(m[i].stats.tokens_per_expert[e]) for m in micro) for e in range(4)] for i in range(2)]
    assert counts_LE.tolist() == expected and counts_LE.sum().item() == 2 * 3 * 6
    update_balancing(layers, counts_LE, 3 * 6)
    for layer, counts in zip(layers, expected):
        assert layer.expert_bias.tolist() == pytest.approx(_direct([0.0] * 4, counts, 0.5))
    logged = balancing_scalars(layers)
    assert set(logged) == {f"moe/layer{i:02d}/{key}" for i in range(2) for key in ("bias", "bias_max_abs")}
    for i, counts in enumerate(expected):
        assert logged[f"moe/layer{i:02d}/bias"] == pytest.approx(_direct([0.0] * 4, counts, 0.5))
        assert logged[f"moe/layer{i:02d}/bias_max_abs"] == max(abs(b) for b in _direct([0.0] * 4, counts, 0.5))


@pytest.mark.parametrize("selection", ["top_k", "top_p"])
def test_decide_with_bias_is_decide_on_shifted_scores(selection):
    cfg = MoEConfig(d_model=8, num_experts=6, top_k=2, scorer="router", d_ffn=8, selection=selection, balance="bias")
    s_TE = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    b_E = torch.tensor([0.8, -0.6, 0.0, 0.3, -1.0, 0.5])
    biased = decide(s_TE, cfg, bias_E=b_E).mask_SE
    assert torch.equal(biased, decide(s_TE + b_E, cfg).mask_SE)
    assert not torch.equal(biased, decide(s_TE, cfg).mask_SE)  # the bias changed decisions


BIAS_CASES = [(s, sel, g) for s in SCORERS for sel in ("top_k", "top_p") for g in ("softmax_topk", "softmax_all")]


@pytest.mark.parametrize("scorer,selection,gate", BIAS_CASES)
def test_biased_layer_matches_the_reference_on_unbiased_gates_and_gradients(scorer, selection, gate):
    """Output, aux and entropy terms, statistics and every gradient against the per-token reference whose selection
    ranks s + b; the bias is large enough to change some decisions."""
    n = NUM_EXPERTS[scorer]
    bias = [0.9 * math.sin(3.0 * i + 1.0) for i in range(n)]
    seed = _seed("bias", scorer, selection, gate)
    cfg = make_cfg(scorer, selection, gate, balance="bias")
    masks = run_and_compare(cfg, (13,), seed, bias=bias)
    unbiased = run_and_compare(make_cfg(scorer, selection, gate, balance="none"), (13,), seed)
    assert masks != unbiased


def test_balance_none_and_bias_drop_the_load_balancing_loss_but_keep_the_top_p_entropy_term():
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    losses = {}
    for balance in ("aux", "bias", "none"):
        for selection in ("top_k", "top_p"):
            torch.manual_seed(5)
            cfg = make_cfg("router", selection, "softmax_topk", balance=balance)
            losses[balance, selection] = float(MoELayer(cfg)(x)[1].aux_loss.detach())
    assert losses["aux", "top_k"] > 0 and losses["bias", "top_k"] == losses["none", "top_k"] == 0.0
    assert 0 < losses["none", "top_p"] == losses["bias", "top_p"] < losses["aux", "top_p"]
    assert not make_cfg("aoe", "top_k", "softmax_topk", balance="bias").unselected_get_gradient


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("balance", "dynamic", "moe.balance: 'dynamic' is not one of 'aux', 'bias', 'none'"),
        ("balance_rate", 0, "moe.balance_rate: must be a positive finite number, got 0"),
        ("balance_rate", -1e-3, "moe.balance_rate: must be a positive finite number"),
        ("balance_rate", "inf", "moe.balance_rate: must be a positive finite number"),
        ("balance_rate", "fast", "moe.balance_rate: expected float, got 'fast'"),
    ],
)
def test_bad_balance_settings_are_config_errors_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        load_config("tiny", [f"moe.{field}={value}"])


def test_bias_needs_token_choice():
    with pytest.raises(ConfigError, match=r"^moe.balance: 'bias' needs token choice"):
        MoEConfig(d_model=8, selection="expert_choice", balance="bias")
    assert MoEConfig(d_model=8, selection="expert_choice", balance="none").balance == "none"
    assert load_config("tiny").moe.balance == "aux" and load_config("tiny").moe.balance_rate == 1e-3
