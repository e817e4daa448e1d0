"""The aux loss in the trainer's form: under an expert-parallel group, `rank_mean_gradients` returns the same value
as the default context and, on every rank, the gradients of the old `ep_size · aux_loss` (bit for bit)."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.parallel.spawn import run_distributed

CASES = [
    dict(scorer="router", dispatcher="alltoall", erc_loss_coeff=0.5),
    dict(scorer="aoe", dispatcher="allgather", selection="top_p"),
    dict(scorer="router", dispatcher="allgather", selection="threshold", threshold_lambda_init=0.5),
]
DIMS = dict(d_model=16, num_experts=4, top_k=2, d_ffn=12, d_low=6)


def _compare(rank: int, world: int) -> list[dict]:
    from aoe_ep.config import MoEConfig
    from aoe_ep.moe import MoELayer, StepContext
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(world)
    results = []
    for i, case in enumerate(CASES):
        torch.manual_seed(10 + i)
        layer = MoELayer(MoEConfig(**{**DIMS, **case}), ep_group=groups.ep_group)
        x = torch.randn(6 + rank, 16, generator=torch.Generator().manual_seed(rank + 20 * i)).requires_grad_()
        inputs = [x, *layer.parameters()]
        _, old = layer(x)
        old_grads = torch.autograd.grad(world * old.aux_loss, inputs, allow_unused=True)
        _, new = layer(x, ctx=StepContext(rank_mean_gradients=True))
        new_grads = torch.autograd.grad(new.aux_loss, inputs, allow_unused=True)
        results.append(
            {
                "value": torch.equal(new.aux_loss, old.aux_loss),
                "grads": all((a is None and b is None) or torch.equal(a, b) for a, b in zip(old_grads, new_grads)),
                "some_grad": any(g is not None and bool(g.abs().sum() > 0) for g in new_grads),
            }
        )
    return results


@pytest.mark.parametrize("world", [2])
def test_rank_mean_aux_loss_equals_the_ep_scaled_one(world):
    for rank, results in enumerate(run_distributed(world, _compare)):
        for case, r in zip(CASES, results):
            assert r == {"value": True, "grads": True, "some_grad": True}, (rank, case)
