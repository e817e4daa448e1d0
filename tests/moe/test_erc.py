"""The ERC loss (arXiv 2512.23447) against the formula written out with explicit loops in float64, value and
gradients; the factorised form; the noise stream; how the layer adds it; and the config checks."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.config import ConfigError, MoEConfig
from aoe_ep.moe import MoELayer, StepContext
from aoe_ep.moe.losses import erc_loss, erc_noise


def _reference(R, W, alpha, u):
    """L_ERC term by term: ε_i from the nearest other row (no gradient), R̃_i = R_i ⊙ (1 + ε_i u_i),
    M[i][j] = ‖R̃_i W_j‖, (1/n²) Σ_i Σ_{j≠i} relu(M[i][j] − α M[i][i]) + relu(M[j][i] − α M[i][i])."""
    n = R.shape[0]
    eps = []
    R0 = R.detach()
    for i in range(n):
        nearest = min(float(torch.sqrt(((R0[i] - R0[j]) ** 2).sum())) for j in range(n) if j != i)
        eps.append(nearest / (2.0 * float(torch.sqrt((R0[i] ** 2).sum()))))
    proxies = [R[i] * (1.0 + eps[i] * u[i]) for i in range(n)]
    M = [[torch.sqrt(((proxies[i] @ W[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    loss = 0.0
    active = 0
    for i in range(n):
        for j in range(n):
            if j == i:
                continue
            for value in (M[i][j] - alpha * M[i][i], M[j][i] - alpha * M[i][i]):
                if value > 0:
                    loss = loss + value
                    active += 1
    return loss / (n * n), torch.tensor(eps, dtype=torch.float64), active


def _inputs(seed, n=5, d=6, width=7, low=3):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(n, d, width, generator=g, dtype=torch.float64) / d**0.5
    W_down = torch.randn(n, d, low, generator=g, dtype=torch.float64) / d**0.5
    W_up = torch.randn(n, low, width, generator=g, dtype=torch.float64) / low**0.5
    u = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
    return R, W, W_down, W_up, u


@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_erc_loss_equals_the_formula_value_and_gradients(seed, alpha):
    R, W, _, _, u = _inputs(seed)
    R1, W1 = R.clone().requires_grad_(), W.clone().requires_grad_()
    loss, eps = erc_loss(R1, W1, alpha, u)
    loss.backward()
    R2, W2 = R.clone().requires_grad_(), W.clone().requires_grad_()
    ref, ref_eps, active = _reference(R2, W2, alpha, u)
    ref.backward()
    n = R.shape[0]
    assert 0 < active < 2 * n * (n - 1)  # some hinges on, some off: the relu is exercised both ways
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(eps, ref_eps, rtol=1e-12, atol=0)
    torch.testing.assert_close(R1.grad, R2.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(W1.grad, W2.grad, rtol=1e-10, atol=1e-14)
    assert R1.grad.abs().sum() > 0 and W1.grad.abs().sum() > 0


def test_erc_loss_of_factorised_experts_equals_the_formula_on_wdown_wup():
    R, _, W_down, W_up, u = _inputs(3)
    Rs, Ds, Us = (t.clone().requires_grad_() for t in (R, W_down, W_up))
    loss, eps = erc_loss(Rs, (Ds, Us), 1.0, u)
    loss.backward()
    Rr, Dr, Ur = (t.clone().requires_grad_() for t in (R, W_down, W_up))
    ref, ref_eps, _ = _reference(Rr, Dr @ Ur, 1.0, u)  # the reference forms W_g = W_down·W_up
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(eps, ref_eps, rtol=1e-12, atol=0)
    for got, want in ((Rs, Rr), (Ds, Dr), (Us, Ur)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-14)


def test_erc_loss_float32_is_close_to_float64():
    R, W, _, _, u = _inputs(4)
    loss32, eps32 = erc_loss(R.float(), W.float(), 1.0, u.float())
    loss64, eps64 = erc_loss(R, W, 1.0, u)
    assert loss32.dtype == eps32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(eps32.double(), eps64, rtol=1e-5, atol=1e-7)


def test_noise_stream_depends_on_seed_layer_and_step_only():
    a = erc_noise(8, 16, seed=3, layer=1, step=5)
    assert torch.equal(a, erc_noise(8, 16, seed=3, layer=1, step=5))
    assert a.shape == (8, 16) and a.min() >= -1 and a.max() < 1 and a.std() > 0.5
    torch.manual_seed(0)  # the global generator plays no part
    assert torch.equal(a, erc_noise(8, 16, seed=3, layer=1, step=5))
    for other in (erc_noise(8, 16, 4, 1, 5), erc_noise(8, 16, 3, 2, 5), erc_noise(8, 16, 3, 1, 6)):
        assert not torch.equal(a, other)


@pytest.mark.parametrize("expert_kind", ["swiglu", "factorized"])
def test_layer_adds_the_weighted_erc_loss_and_routes_with_the_clean_router(expert_kind):
    dims = dict(d_model=16, num_experts=4, top_k=2, d_ffn=12, d_low=6, scorer="router", expert_kind=expert_kind)
    torch.manual_seed(0)
    plain = MoELayer(MoEConfig(**dims))
    layer = MoELayer(MoEConfig(**dims, erc_loss_coeff=0.7, erc_alpha=0.8), index=2)
    layer.load_state_dict(plain.state_dict())
    ctx = StepContext(seed=11, step=9)
    x = torch.randn(20, 16)
    y0, info0 = plain(x)
    y1, info1 = layer(x, ctx=ctx)
    assert torch.equal(y0, y1) and torch.equal(info0.stats.tokens_per_expert, info1.stats.tokens_per_expert)
    experts = layer.experts
    w_gate = (experts.w_down, experts.w_up) if expert_kind == "factorized" else experts.w_gate
    want, eps = erc_loss(layer.scorer.weight, w_gate, 0.8, erc_noise(4, 16, 11, 2, 9))
    torch.testing.assert_close(info1.erc_loss, want.detach())
    torch.testing.assert_close(info1.erc_eps, eps.mean())
    torch.testing.assert_close(info1.aux_loss, info0.aux_loss + 0.7 * want)
    assert info0.erc_loss is None and info0.erc_eps is None
    info1.aux_loss.backward()
    assert layer.scorer.weight.grad.abs().sum() > 0
    layer.eval()  # evaluation computes no ERC term
    _, info2 = layer(x, ctx=ctx)
    assert info2.erc_loss is None


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(scorer="aoe", erc_loss_coeff=1.0), "moe.erc_loss_coeff"),
        (dict(scorer="self_routing", erc_loss_coeff=1.0), "moe.erc_loss_coeff"),
        (dict(scorer="router", router_hidden=8, erc_loss_coeff=1.0), "moe.erc_loss_coeff"),
        (dict(scorer="router", erc_loss_coeff=-0.1), "moe.erc_loss_coeff"),
        (dict(scorer="router", erc_loss_coeff=float("nan")), "moe.erc_loss_coeff"),
        (dict(scorer="router", erc_loss_coeff=True), "moe.erc_loss_coeff"),
        (dict(scorer="router", num_experts=1, top_k=1, erc_loss_coeff=1.0), "moe.erc_loss_coeff"),
        (dict(scorer="router", erc_alpha=0.0), "moe.erc_alpha"),
        (dict(scorer="router", erc_alpha="1"), "moe.erc_alpha"),
    ],
)
def test_bad_erc_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MoEConfig(**{"d_model": 16, "num_experts": 4, "top_k": 2, "d_ffn": 8, "d_low": 4, **overrides})


def test_erc_keeps_no_copy_of_the_gate_weights_for_backward():
    from aoe_ep.bench.measure import saved_bytes_counter

    torch.manual_seed(0)
    saved = {}
    for coeff in (0.0, 1.0):
        layer = MoELayer(
            MoEConfig(d_model=32, num_experts=4, top_k=2, d_ffn=256, scorer="router", erc_loss_coeff=coeff)
        )
        with saved_bytes_counter(exclude=list(layer.parameters())) as count:
            layer(torch.randn(8, 32))
        saved[coeff] = count[0]
    # the ERC products keep only the n proxies and their [X, n, D] products, far less than W_g's 4 x 32 x 256 floats
    assert saved[1.0] - saved[0.0] < layer.experts.w_gate.numel() * 4 / 4
