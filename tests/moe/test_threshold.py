"""Threshold selection (Routing-Free MoE, arXiv 2604.00801): its balancing loss against a direct float64 formula
(value and gradient), the λ update rule (up, down, capped at 1) and the layer's λ after a step, the logged
scalars, and the configuration's errors. The whole layer against the per-token reference is in
test_layer_reference.py."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.config import ConfigError, MoEConfig
from aoe_ep.moe import MoELayer
from aoe_ep.moe.balance import step_token_counts
from aoe_ep.moe.balancing import update_balancing
from aoe_ep.moe.losses import threshold_balance_loss
from aoe_ep.moe.selection import decide, threshold_gates
from aoe_ep.moe.stats import BatchSums
from aoe_ep.moe.threshold import lambda_update, step_density, step_tokens
from aoe_ep.train.balancing_log import balancing_scalars


def _cfg(**over):
    kw = dict(d_model=8, num_experts=5, scorer="router", d_ffn=8, selection="threshold")
    kw.update(over)
    return MoEConfig(**kw)


def _direct_loss(s, b, threshold, mu):
    """L_LB from its definition, one scalar at a time in Python floats (the firing f is a constant)."""
    T, n = len(s), len(s[0])
    G = [[max(s[t][i] - b[i], 0.0) for i in range(n)] for t in range(T)]
    f = [[1.0 if G[t][i] > threshold else 0.0 for i in range(n)] for t in range(T)]
    l_eb = sum((sum(f[t][i] for t in range(T)) / T) * (sum(G[t][i] for t in range(T)) / T) for i in range(n)) / n
    l_tb = sum((sum(f[t]) / n) * (sum(G[t]) / n) for t in range(T)) / T
    return mu * l_eb + (1.0 - mu) * l_tb


def _loss(cfg, s_TE, b_E):
    g_TE = threshold_gates(s_TE, b_E)
    mask_TE = decide(s_TE, cfg, threshold_bias_E=b_E).mask_SE
    probs_TE = torch.softmax(s_TE, dim=1)
    sums = BatchSums.of(mask_TE, probs_TE, torch.zeros(s_TE.shape[0], dtype=s_TE.dtype), s_TE, g_TE=g_TE)
    return threshold_balance_loss(cfg, g_TE, mask_TE, sums)


@pytest.mark.parametrize("threshold,mu", [(0.0, 0.5), (0.25, 0.2), (0.25, 1.0), (0.0, 0.0)])
def test_balance_loss_value_and_gradient_match_the_formula(threshold, mu):
    cfg = _cfg(threshold=threshold, threshold_mu=mu)
    gen = torch.Generator().manual_seed(7)
    s0 = torch.randn(23, 5, generator=gen, dtype=torch.float64)
    b0 = 0.3 * torch.randn(5, generator=gen, dtype=torch.float64)
    s, b = s0.clone().requires_grad_(), b0.clone().requires_grad_()
    loss = _loss(cfg, s, b)
    want = _direct_loss(s0.tolist(), b0.tolist(), threshold, mu)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    ds, db = torch.autograd.grad(loss, [s, b])

    # the gradient from the formula: ∂L/∂G_ti = mu·F_i/(nT) + (1 − mu)·a_t/(nT), a_t = Σ_i f_ti / n, through relu
    T, n = s0.shape
    G = (s0 - b0).clamp_min(0)
    f = (G > threshold).double()
    dG = mu * f.mean(dim=0, keepdim=True) / (n * T) + (1 - mu) * f.mean(dim=1, keepdim=True) / (n * T)
    want_ds = dG * (s0 - b0 > 0).double()
    torch.testing.assert_close(ds, want_ds, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(db, -want_ds.sum(dim=0), rtol=1e-12, atol=1e-15)
    # with a positive threshold, pairs below it but above b get a gradient; with 0 only the fired pairs do
    below_TE = (s0 - b0 > 0) & (f == 0)
    assert bool(below_TE.any()) == (threshold > 0)
    if threshold > 0:
        assert bool((ds[below_TE] != 0).all())


def test_balance_loss_is_zero_under_balance_none_and_on_an_empty_batch():
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(5, dtype=torch.float64)
    assert _loss(_cfg(balance="none"), s, b).item() == 0.0
    assert _loss(_cfg(), s[:0], b).item() == 0.0


def test_decide_fires_pairs_above_the_threshold_only():
    cfg = _cfg(threshold=0.5)
    s = torch.tensor([[2.0, 0.4, 1.6, -3.0, 0.9], [0.0, 0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0, 9.0]])
    b = torch.tensor([1.0, -0.2, 1.0, -3.0, 0.3])
    mask = decide(s, cfg, threshold_bias_E=b).mask_SE
    # G = relu(s − b): [1, 0.6, 0.6, 0, 0.6], [0, 0.2, 0, 3, 0], [8, 9.2, 8, 12, 8.7]
    assert mask.tolist() == [[True, True, True, False, True], [False, False, False, True, False], [True] * 5]
    with pytest.raises(ValueError, match="threshold bias"):
        decide(s, cfg)


def _direct_lambda(lam, rho, target, eta):
    return min(1.0, lam * (1 + eta) ** ((rho > target) - (rho < target)))


@pytest.mark.parametrize("rho,lam", [(0.6, 1e-3), (0.1, 1e-3), (0.25, 1e-3), (0.9, 0.95), (0.9, 1.0)])
def test_lambda_update_up_down_and_capped(rho, lam):
    got = lambda_update(torch.tensor(lam, dtype=torch.float64), rho, 0.25, 0.2)
    assert got.item() == pytest.approx(_direct_lambda(lam, rho, 0.25, 0.2), rel=1e-15)
    if rho > 0.25:
        assert got.item() == min(1.0, lam * 1.2) and got.item() <= 1.0
    elif rho < 0.25:
        assert got.item() < lam
    else:
        assert got.item() == lam


def test_layer_lambdas_follow_the_step_density_and_are_logged():
    cfg = _cfg(threshold_density=0.5, threshold_eta=0.5, threshold_lambda_init=0.1)
    layers = [MoELayer(cfg), MoELayer(cfg)]
    assert "threshold_lambda" in layers[0].state_dict()
    assert "threshold_lambda" not in dict(layers[0].named_parameters())
    assert layers[0].threshold_bias.tolist() == pytest.approx([1e-6] * 5)
    with torch.no_grad():  # layer 0 fires nearly everything, layer 1 nearly nothing
        layers[0].threshold_bias.fill_(-100.0)
        layers[1].threshold_bias.fill_(100.0)
    torch.manual_seed(0)
    micro = [[layer(torch.randn(6, 8))[1] for layer in layers] for _ in range(3)]
    counts_LE = step_token_counts(micro, layers, torch.device("cpu"))
    tokens = step_tokens(micro, torch.device("cpu"))
    assert tokens.tolist() == [18.0]
    density = step_density(counts_LE, tokens[0])
    assert density.tolist() == [counts_LE[0].sum().item() / 90, counts_LE[1].sum().item() / 90]
    assert density.tolist() == [1.0, 0.0]
    update_balancing(layers, counts_LE, tokens[0])
    assert layers[0].threshold_lambda.item() == pytest.approx(0.15)
    assert layers[1].threshold_lambda.item() == pytest.approx(0.1 / 1.5)
    stats = [micro[0][i].stats for i in range(2)]
    logged = balancing_scalars(layers, stats)
    assert logged == pytest.approx(
        {
            "moe/layer00/density": 1.0,
            "moe/layer00/threshold_lambda": 0.15,
            "moe/layer01/density": 0.0,
            "moe/layer01/threshold_lambda": 0.1 / 1.5,
        }
    )


def test_aux_loss_is_lambda_times_the_balance_loss():
    cfg = _cfg(threshold_lambda_init=0.5)
    layer = MoELayer(cfg)
    x = torch.randn(9, 8)
    _, info = layer(x)
    with torch.no_grad():
        layer.threshold_lambda.mul_(0.25)
    _, info_quarter = layer(x)
    assert info.aux_loss.item() > 0
    assert info_quarter.aux_loss.item() == pytest.approx(info.aux_loss.item() * 0.25, rel=1e-6)


@pytest.mark.parametrize(
    "over,field",
    [
        (dict(threshold=-0.1), "moe.threshold"),
        (dict(threshold_density=0.0), "moe.threshold_density"),
        (dict(threshold_density=1.5), "moe.threshold_density"),
        (dict(threshold_mu=1.2), "moe.threshold_mu"),
        (dict(threshold_eta=0.0), "moe.threshold_eta"),
        (dict(threshold_lambda_init=0.0), "moe.threshold_lambda_init"),
        (dict(threshold_lambda_init=2.0), "moe.threshold_lambda_init"),
        (dict(threshold=True), "moe.threshold"),
        (dict(balance="bias"), "moe.balance"),
    ],
)
def test_config_errors_name_the_field(over, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(**over)
