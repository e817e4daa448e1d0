"""An expert placement changes which rank computes an expert, never a result: outputs, aux loss, statistics and
every gradient (mapped back to global experts) equal the contiguous placement's and the single device's; and
`move_experts` carries stacked expert tensors between placements bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from aoe_ep.parallel.spawn import run_distributed

CASES = [
    dict(scorer="aoe", selection="top_k", dispatcher="allgather"),
    dict(scorer="aoe", selection="top_k", dispatcher="alltoall"),
    dict(scorer="aoe", selection="top_p", dispatcher="allgather", gate="softmax_all"),
    dict(scorer="router", selection="expert_choice", dispatcher="alltoall"),
    dict(scorer="router", selection="top_k", dispatcher="allgather"),
    dict(scorer="self_routing", selection="top_k", dispatcher="alltoall", top_k=3),
    dict(scorer="router", selection="top_k", dispatcher="alltoall", erc_loss_coeff=1.0),
    dict(scorer="router", selection="top_k", dispatcher="allgather", erc_loss_coeff=1.0, expert_kind="factorized"),
]
# Scrambled placements of 8 experts (each rank's experts ascending, as `Placement` requires).
PLACEMENTS = {2: [[1, 4, 6, 7], [0, 2, 3, 5]], 4: [[3, 6], [0, 7], [1, 5], [2, 4]]}
RTOL = 1e-5
LAYER_DIMS = dict(d_model=16, num_experts=8, top_k=2, d_ffn=12, d_low=6)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def _run_layer(layer, x_local, g_local, groups):
    x = x_local.clone().requires_grad_()
    y, info = layer(x)
    ((y * g_local).sum() + info.aux_loss).backward()
    grads = {}
    for name, p in layer.named_parameters():
        got = p.grad.clone()
        if getattr(p, "expert_parallel", False):  # back to global experts: [n, ...] with this rank's rows filled
            full = got.new_zeros((layer.cfg.num_experts,) + tuple(got.shape[1:]))
            full[list(layer.held_experts)] = got
            dist.all_reduce(full, group=groups.ep_group)
        else:
            full = got
            dist.all_reduce(full, group=groups.ep_group)
        grads[name] = full
    return y.detach(), info, x.grad, grads


def _check(rank: int, world: int, sizes: list[int]) -> list[dict]:
    from aoe_ep.config import MoEConfig
    from aoe_ep.moe import MoELayer
    from aoe_ep.moe.placement import Placement
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(world)
    placement = Placement.of(PLACEMENTS[world])
    offset = sum(sizes[:rank])
    out = []
    for i, case in enumerate(CASES):
        cfg = MoEConfig(**{**LAYER_DIMS, **case})
        torch.manual_seed(500 + i)
        ref = MoELayer(cfg)
        xs = [torch.randn(n, 16) for n in sizes]
        gs = [torch.randn(n, 16) for n in sizes]
        x_all = torch.cat(xs).requires_grad_()
        y_ref, info_ref = ref(x_all)
        ((y_ref * torch.cat(gs)).sum() + info_ref.aux_loss).backward()

        runs = {}
        for name in ("contiguous", "placed"):
            layer = MoELayer(cfg, ep_group=groups.ep_group)
            if name == "placed":
                layer.set_placement(placement)
            layer.load_full_state_dict(ref.state_dict())
            runs[name] = _run_layer(layer, xs[rank], gs[rank], groups)
        mine = slice(offset, offset + sizes[rank])
        err, exact = {}, {}
        (y_c, info_c, dx_c, grads_c), (y_p, info_p, dx_p, grads_p) = runs["contiguous"], runs["placed"]
        err["y"], exact["y"] = _rel(y_p, y_ref[mine]), torch.equal(y_p, y_c)
        err["x.grad"], exact["x.grad"] = _rel(dx_p, x_all.grad[mine]), torch.equal(dx_p, dx_c)
        err["aux_loss"], exact["aux_loss"] = (
            _rel(info_p.aux_loss, info_ref.aux_loss),
            torch.equal(info_p.aux_loss, info_c.aux_loss),
        )
        for field in ("tokens_per_expert", "load", "ent_load", "ent_conf", "max_minus_min", "score_mean"):
            got, want = getattr(info_p.stats, field), getattr(info_ref.stats, field)
            err[f"stats.{field}"] = _rel(got.double(), want.double())
            exact[f"stats.{field}"] = torch.equal(got, getattr(info_c.stats, field))
        ref_grads = dict(ref.named_parameters())
        for name, g in grads_p.items():
            err[f"grad.{name}"] = _rel(g, ref_grads[name].grad)
            err[f"grad.{name} vs contiguous"] = _rel(g, grads_c[name])
            exact[f"grad.{name}"] = torch.equal(g, grads_c[name])
        out.append({"err": err, "exact": exact})
    return {"cases": out, "move": _move(rank, world)}


@pytest.fixture(scope="module", params=[2, 4])
def placed_results(request):
    world = request.param
    return world, run_distributed(world, _check, [5 + 3 * r for r in range(world)])


def test_placement_changes_no_result(placed_results):
    world, per_rank = placed_results
    failures = [
        f"EP {world} rank {rank} {CASES[i]}: {q} relative error {rel:.2e}"
        for rank, results in enumerate(per_rank)
        for i, r in enumerate(results["cases"])
        for q, rel in r["err"].items()
        if not rel <= RTOL
    ]
    assert not failures, "\n".join(failures)


def test_placement_takes_the_same_decision(placed_results):
    """The decision is taken over global experts, so the token counts are those of the contiguous placement bit for
    bit. (Outputs and gradients agree to rounding only: a rank sums other experts' partial outputs under
    allgather, and CPU matmuls may round differently for rows at another offset of a buffer; for the same reason the
    ERC loss, whose columns are products with each expert's weights where its rank holds them, agrees to rounding.)"""
    world, per_rank = placed_results
    for rank, results in enumerate(per_rank):
        for i, r in enumerate(results["cases"]):
            assert r["exact"]["stats.tokens_per_expert"] and r["exact"]["stats.load"], (world, rank, CASES[i])
            # the ERC term's M columns come from each expert's weights at its position in the local stack
            rounding_only = CASES[i]["dispatcher"] == "allgather" or CASES[i].get("erc_loss_coeff", 0) > 0
            assert r["exact"]["aux_loss"] or rounding_only, (world, rank, CASES[i])


def _move(rank: int, world: int) -> dict:
    from aoe_ep.moe.placement import Placement
    from aoe_ep.parallel.reshard import move_experts

    contiguous, placed = Placement.contiguous(8, world), Placement.of(PLACEMENTS[world])
    stack = torch.tensor(contiguous.experts[rank], dtype=torch.float64).view(-1, 1, 1).expand(-1, 2, 3) * 1.5
    moved = move_experts(stack.contiguous(), contiguous, placed, dist.group.WORLD)
    back = move_experts(moved, placed, contiguous, dist.group.WORLD)
    return {"moved": moved[:, 0, 0].tolist(), "back_equal": torch.equal(back, stack)}


def test_move_experts_carries_each_expert_to_its_new_rank(placed_results):
    world, per_rank = placed_results
    for rank, results in enumerate(per_rank):
        assert results["move"]["moved"] == [1.5 * e for e in PLACEMENTS[world][rank]]
        assert results["move"]["back_equal"]
