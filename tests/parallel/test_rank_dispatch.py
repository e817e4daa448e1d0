"""The `alltoall` dispatcher's per-(token, rank) route on fine-grained experts at EP = 8 (32 experts, top-4: 4 per
rank), in one spawn of 8 gloo processes: every scorer x selection, the per-pair route beside it, a scrambled expert
placement, and tokens whose K experts all sit on one rank equal the single-device layer in outputs, aux loss,
statistics and every gradient, with byte counters equal to the communication model. (EP 2 and 4, where the route is
the default `alltoall`, are in test_dispatchers.py and test_placement.py.)
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from aoe_ep.parallel.spawn import run_distributed

WORLD = 8
DIMS = dict(d_model=32, num_experts=32, top_k=4, d_ffn=8, d_low=4, top_p=0.3)
THRESHOLD = {"aoe": 0.0, "router": 0.3, "self_routing": 0.0}
CASES = [
    dict(scorer=s, selection=sel, gate="softmax_all" if i % 3 == 2 else "softmax_topk")
    for i, (s, sel) in enumerate(
        itertools.product(("aoe", "router", "self_routing"), ("top_k", "top_p", "expert_choice", "threshold"))
    )
]
for case in CASES:
    if case["selection"] == "threshold":
        case.update(threshold=THRESHOLD[case["scorer"]], threshold_lambda_init=0.5)
CASES += [
    dict(scorer="aoe", selection="top_k", combine="pair"),
    dict(scorer="router", selection="top_p", combine="pair", gate="softmax_all"),
    dict(scorer="aoe", selection="top_k", placed=True),
    dict(scorer="router", selection="expert_choice", placed=True),
    dict(scorer="aoe", selection="top_k", expert_kind="factorized", placed=True, combine="pair"),
    dict(scorer="self_routing", selection="top_k", one_rank=True),
    dict(scorer="self_routing", selection="top_k", one_rank=True, placed=True),
]
SIZES = [0] + [2 + r for r in range(1, WORLD)]  # uneven, and rank 0 holds no tokens
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def _placement(num_experts: int, ep: int):
    from aoe_ep.moe.placement import Placement

    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(3)).view(ep, -1)
    return Placement.of(perm.tolist())


def _inputs(case: dict, placement, n: int) -> list[torch.Tensor]:
    xs = [torch.randn(size, DIMS["d_model"]) for size in SIZES]
    if case.get("one_rank"):  # Self-Routing logits: each token's top K experts are all of one rank's experts
        token = 0
        for x in xs:
            for row in x:
                row[:n] = row[:n].abs() * 0.1
                row[list(placement.experts[token % WORLD])] += 5.0
                token += 1
    return xs


def _worker(rank: int, world: int) -> list[dict]:
    from aoe_ep.config import MoEConfig
    from aoe_ep.moe import MoELayer
    from aoe_ep.moe.placement import Placement
    from aoe_ep.moe.selection import decide
    from aoe_ep.parallel.alltoall import AllToAllDispatcher
    from aoe_ep.parallel.comm_model import layer_bytes
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(world)
    offset = sum(SIZES[:rank])
    results = []
    for i, case in enumerate(CASES):
        options = {k: case[k] for k in ("combine", "placed", "one_rank") if k in case}
        cfg = MoEConfig(**{**DIMS, **{k: v for k, v in case.items() if k not in options}}, dispatcher="alltoall")
        n = cfg.num_experts
        placement = _placement(n, world) if options.get("placed") else Placement.contiguous(n, world)
        torch.manual_seed(2000 + i)
        ref = MoELayer(cfg)
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(2.0)
        xs = _inputs(case, placement, n)
        gs = [torch.randn_like(x) for x in xs]
        x_all = torch.cat(xs).requires_grad_()
        threshold_bias = getattr(ref, "threshold_bias", None)
        if threshold_bias is not None:  # b at each expert's median score, above the first token's: 0..n experts
            with torch.no_grad():
                s_TE = ref.scorer(x_all).s_TE
                threshold_bias.copy_(torch.maximum(s_TE.median(dim=0).values, s_TE[0] + 0.05))
        y_ref, info_ref = ref(x_all)
        ((y_ref * torch.cat(gs)).sum() + info_ref.aux_loss).backward()

        dispatcher = AllToAllDispatcher(groups.ep_group, n, combine=options.get("combine", "rank"))
        layer = MoELayer(cfg, dispatcher=dispatcher)
        layer.set_placement(placement)
        layer.load_full_state_dict(ref.state_dict())
        x = xs[rank].clone().requires_grad_()
        y, info = layer(x)
        ((y * gs[rank]).sum() + info.aux_loss).backward()

        mine = slice(offset, offset + SIZES[rank])
        err = {
            "y": _rel(y, y_ref[mine]),
            "aux_loss": _rel(info.aux_loss, info_ref.aux_loss),
            "x.grad": _rel(x.grad, x_all.grad[mine]),
        }
        for field in (
            "tokens_per_expert",
            "load",
            "ent_load",
            "ent_conf",
            "max_minus_min",
            "score_mean",
            "score_margin",
            "margin_tokens",
        ):
            err[f"stats.{field}"] = _rel(getattr(info.stats, field).double(), getattr(info_ref.stats, field).double())
        ref_params = dict(ref.named_parameters())
        for name, p in layer.named_parameters():
            got = p.grad.clone()
            if getattr(p, "expert_parallel", False):  # back to global experts, every rank's rows filled
                full = got.new_zeros((n,) + tuple(got.shape[1:]))
                full[list(layer.held_experts)] = got
                got = full
            dist.all_reduce(got, group=groups.ep_group)  # replicated: the EP-group sum is the reference
            err[f"grad.{name}"] = _rel(got, ref_params[name].grad)

        with torch.no_grad():
            mask = decide(ref.scorer(x_all).s_TE, cfg, threshold_bias_E=threshold_bias).mask_SE
        model = layer_bytes(
            "alltoall",
            mask,
            SIZES,
            rank,
            cfg.d_model,
            cfg.d_low,
            4,
            aoe_cache=cfg.scorer == "aoe",
            expert_choice=cfg.selection == "expert_choice",
            threshold=threshold_bias is not None,
            combine=options.get("combine", "rank"),
            order=placement.order,
        )
        ranks_per_token = mask[:, placement.order].view(mask.shape[0], world, -1).any(dim=2).sum(dim=1)
        results.append(
            {
                "err": err,
                "bytes": dispatcher.counter.as_dict(),
                "model": model,
                "ranks_per_token": ranks_per_token.tolist(),
                "experts_per_token": mask.sum(dim=1).tolist(),
            }
        )
    return results


@pytest.fixture(scope="module")
def ep8_results():
    return run_distributed(WORLD, _worker)


def test_both_routes_match_the_single_device_layer_at_ep8(ep8_results):
    failures = [
        f"rank {rank} {CASES[i]}: {quantity} relative error {rel:.2e}"
        for rank, results in enumerate(ep8_results)
        for i, r in enumerate(results)
        for quantity, rel in r["err"].items()
        if not rel <= RTOL
    ]
    assert not failures, "\n".join(failures)


def test_byte_counters_equal_the_model_at_ep8(ep8_results):
    for rank, results in enumerate(ep8_results):
        for i, r in enumerate(results):
            assert r["bytes"] == r["model"], (rank, CASES[i])
    assert any(r["bytes"].get("cache/fwd") for r in ep8_results[1])  # AoE's cache rows did travel


def test_the_cases_exercise_shared_and_single_ranks(ep8_results):
    """Fine-grained routing puts several of a token's experts on one rank; the forced cases put all of them there;
    threshold selection gives tokens of no expert and of several."""
    for i, case in enumerate(CASES):
        per_token, experts = ep8_results[0][i]["ranks_per_token"], ep8_results[0][i]["experts_per_token"]
        if case.get("one_rank"):
            assert per_token == [1] * len(per_token) and set(experts) == {DIMS["top_k"]}, case
        elif case["selection"] == "top_k":
            assert sum(per_token) < sum(experts), case  # some token reaches fewer ranks than it has experts
        if case["selection"] == "threshold":
            assert 0 in experts and max(experts) >= 2, case


def test_the_rank_route_sends_each_token_once_per_rank():
    """The model on a hand-made mask, EP 2 with 4 experts per rank: rank 0's token 1 picks all four of rank 1's
    experts; rank 1's token 2 picks one expert on each rank; tokens 0 and 3 stay on their own rank."""
    from aoe_ep.parallel.comm_model import layer_bytes

    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, [0, 1, 2, 3]] = True
    mask[1, [4, 5, 6, 7]] = True
    mask[2, [0, 4]] = True
    mask[3, [5, 6]] = True
    common = dict(
        mask_TE=mask, sizes=[2, 2], rank=0, d_model=16, d_low=4, elem_bytes=4, aoe_cache=True, expert_choice=False
    )
    rank, pair = layer_bytes("alltoall", combine="rank", **common), layer_bytes("alltoall", combine="pair", **common)
    assert pair["dispatch/fwd"] == 4 * (16 + 4) * 4 and pair["combine/bwd"] == 4 * 16 * 4
    # one row of d + 1 (its 4 expert flags in one column), the cache row and gate of each of its 4 pairs
    assert rank["dispatch/fwd"] == 1 * (16 + 1) * 4 and rank["dispatch/bwd"] == 1 * 16 * 4
    assert rank["cache/fwd"] == 4 * 4 * 4 and rank["gates/fwd"] == 4 * 4
    assert rank["combine/bwd"] == 1 * 16 * 4  # the gradient of the one combined row
    assert rank["combine/fwd"] == pair["combine/fwd"] == 1 * 16 * 4  # token 2's row from expert 0
    assert rank["counts/fwd"] == 8 and pair["counts/fwd"] == 4 * 8
    with pytest.raises(ValueError, match="combine must be one of"):
        layer_bytes("alltoall", combine="token", **common)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_expert_flags_survive_the_row_dtype(dtype):
    """A row's expert flags travel 8 to a column in the rows' dtype and come back exactly, for any expert count."""
    from aoe_ep.parallel.rank_dispatch import pack_experts, unpack_experts

    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 32):
        flags = torch.rand(40, n, generator=gen) < 0.5
        flags[0] = True  # the largest code of every column, 255 where the column is full
        codes = pack_experts(flags)
        assert codes.shape == (40, -(-n // 8))
        assert torch.equal(unpack_experts(codes.to(dtype), n), flags), n
        assert unpack_experts(pack_experts(flags[:0]).to(dtype), n).shape == (0, n)  # a rank that sends no row
