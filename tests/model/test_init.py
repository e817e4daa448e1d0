"""`init_parameters` keeps the layers' own distributions (per parameter, std and mean as the modules' own
initialisation draws them), depends on the seed alone, draws no two experts alike, and refuses a parameter it
has no rule for. That the values do not depend on the layout is tested through the trainer in
tests/train/test_layouts.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aoe_ep.config import ModelConfig, MoEConfig
from aoe_ep.model import Decoder, init_parameters

VARIANTS = {
    "dense": dict(ffn="dense"),
    "aoe": dict(scorer="aoe"),
    "router": dict(scorer="router"),
    "router_large_factorized": dict(scorer="router", router_hidden=64, expert_kind="factorized"),
    "self_routing": dict(scorer="self_routing"),
}


def _model(variant: str, seed: int = 0) -> Decoder:
    kw = dict(VARIANTS[variant])
    ffn = kw.pop("ffn", "moe")
    model_cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, vocab_size=300, max_seq_len=8, ffn=ffn, d_ffn=96)
    moe_cfg = MoEConfig(d_model=64, num_experts=8, top_k=2, d_ffn=96, d_low=16, **kw) if ffn == "moe" else None
    torch.manual_seed(seed)
    return Decoder(model_cfg, moe_cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_distributions_are_the_layers_own(variant):
    own = dict(_model(variant).named_parameters())
    model = _model(variant)
    init_parameters(model, seed=3)
    for name, p in model.named_parameters():
        p, ref = p.detach(), own[name].detach()
        if ref.std() == 0:  # RMSNorm weights: ones
            assert torch.equal(p, ref), name
            continue
        assert float(p.std()) == pytest.approx(float(ref.std()), rel=0.15), name
        assert abs(float(p.mean())) < 4 * float(ref.std()) / p.numel() ** 0.5 + 1e-3, name
        assert not torch.equal(p, ref), name  # redrawn, not left as the global stream made it


def test_values_depend_on_the_seed_only_and_experts_differ():
    a, b, c = _model("aoe", seed=0), _model("aoe", seed=1), _model("aoe", seed=2)
    init_parameters(a, seed=5), init_parameters(b, seed=5), init_parameters(c, seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.std() > 0:
            assert not torch.equal(pa, pc), name
    w_up = a.blocks[0].ffn.experts.w_up
    assert not any(torch.equal(w_up[i], w_up[j]) for i in range(8) for j in range(i))
    assert not torch.equal(a.blocks[0].ffn.experts.w_up, a.blocks[1].ffn.experts.w_up)  # layers differ too


def test_a_parameter_without_a_rule_is_refused():
    model = _model("dense")
    model.blocks[0].extra = nn.Linear(4, 4, bias=True)
    with pytest.raises(TypeError, match=r"no initialisation rule for blocks\.0\.extra\.bias"):
        init_parameters(model, seed=0)
