"""The balancing schemes as objects: which one a config chooses, the state each registers on the layer (under the
state-dict names checkpoints use), each one's update rule against its formula, and the values each logs."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.config import MoEConfig
from aoe_ep.moe import MoELayer, StepContext
from aoe_ep.moe.balance import bias_update
from aoe_ep.moe.balancing import (
    AuxLoss,
    BiasBalancing,
    ExpertRouterCoupling,
    ThresholdBalancing,
    build_balancing,
    build_coupling,
    needs_step_counts,
    update_balancing,
)
from aoe_ep.moe.threshold import lambda_update

DIMS = dict(d_model=8, num_experts=4, top_k=2, scorer="router", d_ffn=8)


def _cfg(**over) -> MoEConfig:
    return MoEConfig(**{**DIMS, **over})


@pytest.mark.parametrize(
    "over,scheme,updates",
    [
        (dict(), AuxLoss, False),
        (dict(balance="none"), AuxLoss, False),
        (dict(selection="expert_choice"), AuxLoss, False),
        (dict(balance="bias"), BiasBalancing, True),
        (dict(balance="bias", selection="top_p"), BiasBalancing, True),
        (dict(selection="threshold"), ThresholdBalancing, True),
        (dict(selection="threshold", balance="none"), ThresholdBalancing, False),
    ],
)
def test_the_config_chooses_one_scheme_with_its_state(over, scheme, updates):
    layer = MoELayer(_cfg(**over))
    assert type(layer.balancing) is scheme and type(build_balancing(layer.cfg)) is scheme
    assert layer.balancing.updates_per_step is updates and needs_step_counts([layer]) is updates
    buffers, params = dict(layer.named_buffers()), dict(layer.named_parameters())
    assert ("expert_bias" in buffers) is (scheme is BiasBalancing)
    assert ("threshold_lambda" in buffers) is (scheme is ThresholdBalancing)
    assert ("threshold_bias" in params) is (scheme is ThresholdBalancing)
    assert not any(key.startswith("balancing.") for key in layer.state_dict())
    assert layer.coupling is None


def test_erc_is_chosen_on_top_of_the_balancing_scheme():
    layer = MoELayer(_cfg(balance="bias", erc_loss_coeff=0.5, erc_alpha=0.9))
    assert type(layer.balancing) is BiasBalancing and isinstance(layer.coupling, ExpertRouterCoupling)
    assert (layer.coupling.coeff, layer.coupling.alpha) == (0.5, 0.9)
    assert build_coupling(_cfg()) is None


def test_bias_scheme_moves_its_buffer_by_the_rule_and_logs_it():
    layer = MoELayer(_cfg(balance="bias", balance_rate=0.25))
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    before = layer.expert_bias.clone()
    counts_E = torch.tensor([9.0, 1.0, 4.0, 2.0])  # mean 4: down, up, stays, up
    layer.balancing.update(layer, counts_E, 8)
    assert layer.expert_bias.tolist() == [0.25, 0.0, 0.0, 1.25]
    assert torch.equal(layer.expert_bias, bias_update(before, counts_E, 0.25))
    assert layer.balancing.log_values(layer, None) == {"bias": [0.25, 0.0, 0.0, 1.25], "bias_max_abs": 1.25}


@pytest.mark.parametrize("fired,expected", [(12, 0.2 * 1.5), (4, 0.2 / 1.5), (8, 0.2)])
def test_threshold_scheme_moves_lambda_toward_the_target_density(fired, expected):
    # 4 experts x 8 tokens = 32 pairs, target density 0.25 = 8 fired pairs
    layer = MoELayer(_cfg(selection="threshold", threshold_density=0.25, threshold_eta=0.5, threshold_lambda_init=0.2))
    counts_E = torch.tensor([float(fired), 0.0, 0.0, 0.0], dtype=torch.float64)
    want = lambda_update(layer.threshold_lambda.clone(), fired / 32, 0.25, 0.5)
    layer.balancing.update(layer, counts_E, torch.tensor(8.0, dtype=torch.float64))
    assert layer.threshold_lambda.item() == pytest.approx(expected)
    assert torch.equal(layer.threshold_lambda, want)


def test_threshold_scheme_without_balance_loss_keeps_lambda_and_logs_the_density():
    layer = MoELayer(_cfg(selection="threshold", balance="none", threshold_lambda_init=0.2))
    layer.balancing.update(layer, torch.tensor([32.0, 32.0, 32.0, 32.0]), 32)
    assert layer.threshold_lambda.item() == pytest.approx(0.2)
    _, info = layer(torch.randn(10, 8))
    logged = layer.balancing.log_values(layer, info.stats)
    fired = int(info.stats.tokens_per_expert.sum())
    assert logged == pytest.approx({"density": fired / 40, "threshold_lambda": 0.2})
    assert layer.balancing.log_values(layer, None) == pytest.approx({"threshold_lambda": 0.2})


def test_aux_loss_scheme_has_no_state_to_move():
    layer = MoELayer(_cfg())
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    update_balancing([layer], torch.tensor([[5.0, 0.0, 0.0, 3.0]]), 4)
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())
    assert layer.balancing.log_values(layer, None) == {}


def test_update_balancing_gives_each_layer_its_own_counts():
    layers = [
        MoELayer(_cfg(balance="bias", balance_rate=1.0)),
        MoELayer(_cfg()),
        MoELayer(_cfg(balance="bias", balance_rate=0.5)),
    ]
    counts_LE = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 4.0]], dtype=torch.float64)
    update_balancing(layers, counts_LE, 4)
    assert layers[0].expert_bias.tolist() == [-1.0, 1.0, 1.0, 1.0]
    assert layers[2].expert_bias.tolist() == [0.5, 0.5, 0.5, -0.5]


def test_the_bias_scheme_ranks_the_shifted_scores_in_the_layer():
    # a large bias on expert 3 puts it in every token's top-2; the gates still follow the unbiased scores
    layer = MoELayer(_cfg(balance="bias"))
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1e3]))
    _, info = layer(torch.randn(12, 8), ctx=StepContext(record_selection=True))
    assert info.mask_TE[:, 3].all() and int(info.stats.tokens_per_expert[3]) == 12
