"""The plan's parameter, gradient and optimizer bytes equal what the trainer allocates, after one real step."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.plan.state import model_parameters, rank_state, sharded_over_ep, state_shards
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config

MODELS = {
    "aoe": [],
    "router": ["moe.scorer=router"],
    "dense": ["model.ffn=dense", "model.d_ffn=48"],
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("model", list(MODELS))
def test_state_bytes_equal_the_trainers_tensors(tmp_path, model):
    cfg = small_config(tmp_path, "train.eval_at_start=false", *MODELS[model])
    with Trainer(cfg, data=BUILDERS) as trainer:
        trainer._train_step(timed=False)
        params = list(trainer.dp.model.parameters())
        optimizer_state = [v for state in trainer.optimizer.state.values() for v in state.values()]
        weights, grads, moments = _bytes(params), _bytes(p.grad for p in params), _bytes(optimizer_state)
        experts = sum(p.numel() for p in params if getattr(p, "expert_parallel", False))
    plan = rank_state(cfg, ep=1, world=1)
    assert (plan.bytes_weights, plan.bytes_grads, plan.bytes_optimizer) == (weights, grads, moments)
    assert plan.params_expert == experts and plan.params_dense + plan.params_expert == sum(p.numel() for p in params)
    assert (experts > 0) == (model != "dense")


def test_expert_parallel_and_fsdp_divide_the_state(tmp_path):
    cfg = small_config(tmp_path, "moe.num_experts=4", "moe.dispatcher=alltoall")
    one, four = rank_state(cfg, ep=1, world=1), rank_state(cfg, ep=4, world=4)
    assert four.params_expert * 4 == one.params_expert and four.params_dense == one.params_dense
    assert state_shards("ddp", 8, 4) == (1, 1) and state_shards("fsdp", 8, 4) == (8, 2)
    fsdp = small_config(tmp_path, "moe.num_experts=4", "moe.dispatcher=alltoall", "train.dense_parallel=fsdp")
    sharded, unsharded = rank_state(fsdp, ep=2, world=4), rank_state(cfg, ep=2, world=4)
    assert sharded.bytes_weights < unsharded.bytes_weights and sharded.bytes_grads < unsharded.bytes_grads
    # with gradient accumulation FSDP2 holds the unsharded gradients until the last micro-batch
    accumulating = rank_state(fsdp, ep=2, world=4, micro_batches=2)
    assert accumulating.bytes_grads == unsharded.bytes_grads and accumulating.bytes_weights == sharded.bytes_weights


@pytest.mark.parametrize(
    "layout",
    ["dp4_ddp", "dp4_fsdp", "ep2_allgather_fsdp", "ep2_alltoall_fsdp", "ep2_alltoall_ddp", "ep4_allgather_fsdp"],
)
def test_optimizer_bytes_are_what_the_layout_test_measures_on_4_ranks(tmp_path, layout):
    """tests/train/test_layouts.py holds each rank's optimizer bytes on 4 gloo ranks to `expected_optimizer_bytes`;
    the plan gives the same figure for the same layouts."""
    from tests.train.test_layouts import LAYOUTS, WORLD, _config, expected_optimizer_bytes

    overrides, ep, _ = LAYOUTS[layout]
    cfg = _config(tmp_path, layout, *overrides)
    params = model_parameters(cfg)
    experts = {p.name for p in params if p.expert or sharded_over_ep(p, cfg, ep)}
    want = expected_optimizer_bytes(
        {p.name: torch.Size(p.shape) for p in params}, experts, WORLD, ep, "train.dense_parallel=fsdp" in overrides
    )
    assert rank_state(cfg, ep=ep, world=WORLD, params=params).bytes_optimizer == want
