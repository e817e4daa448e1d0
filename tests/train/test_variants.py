"""Every FFN the decoder offers trains: dense SwiGLU, routed MoE (also with factorised experts and a large router),
AoE and Self-Routing, under each selection strategy, in fp32 and under bf16 autocast (CPU autocast here; the GPU
path differs only in the device)."""

from __future__ import annotations

import math

import pytest

from aoe_ep.train.trainer import train
from tests.train.synthetic import BUILDERS, small_config

CASES = [
    ("dense", ["model.ffn=dense", "model.d_ffn=48"]),
    ("aoe_top_k_bf16", ["train.precision=bf16"]),
    ("aoe_top_p", ["moe.selection=top_p"]),
    ("aoe_expert_choice", ["moe.selection=expert_choice", "moe.aux_loss_coeff=0.0"]),
    ("router_top_k", ["moe.scorer=router"]),
    ("router_factorized_bf16", ["moe.scorer=router", "moe.expert_kind=factorized", "train.precision=bf16"]),
    ("router_large", ["moe.scorer=router", "moe.router_hidden=16"]),
    ("self_routing_top_p", ["moe.scorer=self_routing", "moe.selection=top_p", "moe.aux_loss_coeff=0.0"]),
]


@pytest.mark.parametrize("name, overrides", CASES, ids=[c[0] for c in CASES])
def test_each_ffn_trains(tmp_path, name, overrides):
    cfg = small_config(tmp_path, "train.max_steps=5", "train.eval_interval=5", "train.save_interval=5", *overrides)
    result = train(cfg, data=BUILDERS)
    losses = [r.loss for r in result.history]
    assert all(math.isfinite(x) for x in losses)
    assert result.evals[-1][1] < result.evals[0][1]  # validation loss fell within 5 steps
    aux = [r.aux_loss for r in result.history]
    if cfg.model.ffn == "dense" or cfg.moe.aux_loss_coeff == 0.0 and cfg.moe.selection != "top_p":
        assert aux == [0.0] * 5
    else:
        assert all(a > 0 for a in aux)
