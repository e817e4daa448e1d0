"""The paper's Table 2 ablation layers: factorised experts under a router (config 3) and the large router (config 4),
against the per-token reference `aoe_ep.moe.reference`."""

import torch

from aoe_ep.config import MoEConfig
from aoe_ep.moe import MoELayer, reference


def _compare(cfg, expected_params):
    torch.manual_seed(0)
    layer = MoELayer(cfg).double()
    assert sorted(name for name, _ in layer.named_parameters()) == sorted(expected_params)
    x = torch.randn(11, cfg.d_model, dtype=torch.float64, requires_grad=True)
    g = torch.randn(11, cfg.d_model, dtype=torch.float64)
    y, info = layer(x)
    ((y * g).sum() + info.aux_loss).backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    x_grad = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    params = dict(layer.named_parameters())
    ref = reference.forward(cfg, params, x)
    y_ref, aux_ref, counts = ref.y, ref.aux_loss, ref.stats["tokens_per_expert"]
    ((y_ref * g).sum() + aux_ref).backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info.aux_loss, aux_ref, rtol=1e-10, atol=1e-12)
    assert info.stats.tokens_per_expert.tolist() == counts
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-9, atol=1e-11)
    for name, grad in got.items():
        torch.testing.assert_close(grad, params[name].grad, rtol=1e-9, atol=1e-11, msg=name)


def test_router_with_factorised_experts():
    cfg = MoEConfig(d_model=12, num_experts=4, top_k=2, scorer="router", expert_kind="factorized", d_ffn=10, d_low=5)
    assert cfg.d_wide == -(-(3 * 12 * 10 - 5 * 12) // (5 + 24))
    _compare(cfg, ("scorer.weight", "experts.w_down", "experts.w_up", "experts.w_p", "experts.w_o"))


def test_large_router():
    cfg = MoEConfig(d_model=12, num_experts=4, top_k=2, scorer="router", router_hidden=20, d_ffn=10)
    _compare(cfg, ("scorer.w_hidden", "scorer.weight", "experts.w_gate", "experts.w_p", "experts.w_o"))
