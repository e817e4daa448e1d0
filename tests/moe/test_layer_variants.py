"""The paper's Table 2 ablation layers: factorised experts under a router (config 3) and the large router (config 4),
against formulas written here, token by token."""

import torch
import torch.nn.functional as F

from aoe_ep.config import MoEConfig
from aoe_ep.moe import MoELayer


def _reference(x, scores_fn, expert_fn, n, k, coeff):
    ys, probs, chosen = [], [], []
    for t in range(x.shape[0]):
        s = scores_fn(x[t])
        order = sorted(range(n), key=lambda i: (-float(s[i].detach()), i))[:k]
        g = torch.softmax(s[order], dim=0)
        ys.append(sum(g[j] * expert_fn(order[j], x[t]) for j in range(k)))
        probs.append(torch.softmax(s, dim=0))
        chosen.append(order)
    counts = torch.tensor([sum(i in c for c in chosen) for i in range(n)], dtype=x.dtype)
    p_mean = torch.stack(probs).mean(dim=0)
    aux = coeff * n * (counts / x.shape[0] * p_mean).sum()
    return torch.stack(ys), aux, counts


def _compare(cfg, scores_fn, expert_fn):
    torch.manual_seed(0)
    layer = MoELayer(cfg).double()
    x = torch.randn(11, cfg.d_model, dtype=torch.float64, requires_grad=True)
    g = torch.randn(11, cfg.d_model, dtype=torch.float64)
    y, info = layer(x)
    ((y * g).sum() + info.aux_loss).backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    x_grad = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    params = dict(layer.named_parameters())
    y_ref, aux_ref, counts = _reference(x, lambda xt: scores_fn(params, xt), lambda i, xt: expert_fn(params, i, xt),
                                        cfg.num_experts, cfg.top_k, cfg.aux_loss_coeff)
    ((y_ref * g).sum() + aux_ref).backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info.aux_loss, aux_ref, rtol=1e-10, atol=1e-12)
    assert info.stats.tokens_per_expert.tolist() == counts.long().tolist()
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-9, atol=1e-11)
    for name, grad in got.items():
        torch.testing.assert_close(grad, params[name].grad, rtol=1e-9, atol=1e-11, msg=name)


def test_router_with_factorised_experts():
    cfg = MoEConfig(d_model=12, num_experts=4, top_k=2, scorer="router", expert_kind="factorized", d_ffn=10, d_low=5)
    assert cfg.d_wide == -(-(3 * 12 * 10 - 5 * 12) // (5 + 24))

    def expert(p, i, xt):
        c = xt @ p["experts.w_down"][i]
        return (F.silu(c @ p["experts.w_up"][i]) * (xt @ p["experts.w_p"][i])) @ p["experts.w_o"][i]

    _compare(cfg, lambda p, xt: p["scorer.weight"] @ xt, expert)


def test_large_router():
    cfg = MoEConfig(d_model=12, num_experts=4, top_k=2, scorer="router", router_hidden=20, d_ffn=10)

    def expert(p, i, xt):
        return (F.silu(xt @ p["experts.w_gate"][i]) * (xt @ p["experts.w_p"][i])) @ p["experts.w_o"][i]

    _compare(cfg, lambda p, xt: p["scorer.weight"] @ F.silu(xt @ p["scorer.w_hidden"]), expert)
