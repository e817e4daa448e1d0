"""Every expert-parallel path equals the single-device layer on the EP group's concatenated batch.

One spawn per process layout runs every case (spawning is the slow part on a 2-core machine); each case reports
relative errors, and the byte counters next to the communication model.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from aoe_ep.parallel.spawn import run_distributed

SCORERS = ("aoe", "router", "self_routing")
SELECTIONS = ("top_k", "top_p", "expert_choice")
DISPATCHERS = ("allgather", "alltoall")
CASES = [
    dict(scorer=s, selection=sel, dispatcher=disp, gate=("softmax_all" if i % 3 == 2 else "softmax_topk"))
    for i, (s, sel, disp) in enumerate(itertools.product(SCORERS, SELECTIONS, DISPATCHERS))
]
CASES += [
    dict(scorer="aoe", selection="top_k", dispatcher=disp, norm=norm) for disp in DISPATCHERS for norm in ("l1", "linf")
]
CASES += [dict(scorer="router", selection="top_k", dispatcher=disp, expert_kind="factorized") for disp in DISPATCHERS]
# The ERC loss (arXiv 2512.23447): one all-gather of M's expert columns; SwiGLU and factorised experts.
CASES += [
    dict(scorer="router", selection="top_k", dispatcher=disp, erc_loss_coeff=1.0, erc_alpha=alpha, **kind)
    for disp in DISPATCHERS
    for alpha, kind in ((1.0, {}), (0.7, dict(expert_kind="factorized")))
]
# Threshold selection (Routing-Free MoE): b is set to each expert's median score on the group's batch (and above the
# first token's scores), so that tokens fire 0..n experts; λ large enough that the balancing loss shows in the
# gradients.
CASES += [
    dict(scorer=s, selection="threshold", dispatcher=disp, threshold=thr, threshold_lambda_init=0.5)
    for disp in DISPATCHERS
    for s, thr in (("aoe", 0.0), ("aoe", 0.3), ("router", 0.3), ("self_routing", 0.0))
]
LAYOUTS = {"ep2": (2, 2), "ep4": (4, 4), "dp2xep2": (4, 2)}
RTOL = 1e-5
LAYER_DIMS = dict(d_model=16, num_experts=8, top_k=2, d_ffn=12, d_low=6)  # a case may override them


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def _check_layout(rank: int, world: int, ep: int, cases: list[dict], sizes: list[int]) -> dict:
    from aoe_ep.config import MoEConfig
    from aoe_ep.moe import MoELayer
    from aoe_ep.moe.selection import decide, select
    from aoe_ep.parallel.comm_model import layer_bytes
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(ep)
    members = list(range((rank // ep) * ep, (rank // ep) * ep + ep))
    offset = sum(sizes[r] for r in members if r < rank)
    results = {}
    for i, case in enumerate(cases):
        cfg = MoEConfig(**{**LAYER_DIMS, **case})
        torch.manual_seed(1000 + i)
        ref = MoELayer(cfg)
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(2.0)
        xs = [torch.randn(n, 16) for n in sizes]
        gs = [torch.randn(n, 16) for n in sizes]
        x_group = torch.cat([xs[r] for r in members]).requires_grad_()
        threshold_bias = getattr(ref, "threshold_bias", None)
        if threshold_bias is not None:
            with torch.no_grad():
                s_TE = ref.scorer(x_group).s_TE  # b above the group's first token's scores: it fires no expert
                threshold_bias.copy_(torch.maximum(s_TE.median(dim=0).values, s_TE[0] + 0.05))
        y_ref, info_ref = ref(x_group)
        ((y_ref * torch.cat([gs[r] for r in members])).sum() + info_ref.aux_loss).backward()

        layer = MoELayer(cfg, ep_group=groups.ep_group)
        layer.load_full_state_dict(ref.state_dict())
        x = xs[rank].clone().requires_grad_()
        y, info = layer(x)
        ((y * gs[rank]).sum() + info.aux_loss).backward()

        mine = slice(offset, offset + sizes[rank])
        err = {
            "y": _rel(y, y_ref[mine]),
            "aux_loss": _rel(info.aux_loss, info_ref.aux_loss),
            "x.grad": _rel(x.grad, x_group.grad[mine]),
        }
        if cfg.erc_loss_coeff:
            err["erc_loss"] = _rel(info.erc_loss, info_ref.erc_loss)
            err["erc_eps"] = _rel(info.erc_eps, info_ref.erc_eps)
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
            if getattr(p, "expert_parallel", False):
                expected = ref_params[name].grad[layer.expert_offset : layer.expert_offset + layer.num_local_experts]
                got = p.grad
            else:  # replicated: each rank's gradient comes from its tokens; the EP-group sum is the reference
                expected, got = ref_params[name].grad, p.grad.clone()
                dist.all_reduce(got, group=groups.ep_group)
            err[f"grad.{name}"] = _rel(got, expected)

        with torch.no_grad():
            s_TE = ref.scorer(x_group).s_TE
            mask = (
                select(s_TE, cfg).mask_TE
                if threshold_bias is None
                else decide(s_TE, cfg, threshold_bias_E=threshold_bias).mask_SE
            )
        model = layer_bytes(
            cfg.dispatcher,
            mask,
            [sizes[r] for r in members],
            rank - members[0],
            cfg.d_model,
            cfg.d_low,
            4,
            aoe_cache=cfg.scorer == "aoe",
            expert_choice=cfg.selection == "expert_choice",
            threshold=threshold_bias is not None,
            erc=cfg.erc_loss_coeff > 0,
        )
        if threshold_bias is not None:  # the data must exercise tokens of no expert and of several
            fired = mask.sum(dim=1)
            err["threshold_data"] = 0.0 if bool((fired == 0).any() and (fired >= 2).any()) else 1.0
        results[i] = {"err": err, "bytes": layer.dispatcher.counter.as_dict(), "model": model}
    return results


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_results(request):
    world, ep = LAYOUTS[request.param]
    sizes = [5 + 2 * r for r in range(world)]  # uneven token counts per rank
    if request.param == "dp2xep2":
        sizes[0] = 0  # a rank with no tokens still takes part in every collective
    return request.param, run_distributed(world, _check_layout, ep, CASES, sizes)


def test_every_path_matches_single_device(layout_results):
    name, per_rank = layout_results
    failures = []
    for rank, results in enumerate(per_rank):
        for i, case in enumerate(CASES):
            for quantity, rel in results[i]["err"].items():
                if not rel <= RTOL:
                    failures.append(f"{name} rank {rank} {case}: {quantity} relative error {rel:.2e}")
    assert not failures, "\n".join(failures)


def test_byte_counters_equal_the_communication_model(layout_results):
    name, per_rank = layout_results
    for rank, results in enumerate(per_rank):
        for i, case in enumerate(CASES):
            assert results[i]["bytes"] == results[i]["model"], f"{name} rank {rank} {case}"


def _ties(rank: int, world: int, dispatcher: str) -> list:
    from aoe_ep.config import MoEConfig
    from aoe_ep.moe import MoELayer
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(world)
    out = []
    for scorer, selection in (
        ("self_routing", "top_k"),
        ("self_routing", "top_p"),
        ("router", "top_k"),
        ("self_routing", "expert_choice"),
    ):
        cfg = MoEConfig(
            d_model=16,
            num_experts=8,
            top_k=2,
            d_ffn=8,
            scorer=scorer,
            selection=selection,
            top_p=0.3,
            dispatcher=dispatcher,
        )
        torch.manual_seed(7)
        ref = MoELayer(cfg)
        if scorer == "router":
            with torch.no_grad():
                ref.scorer.weight.copy_(ref.scorer.weight[:1].expand(8, -1))  # every expert scores alike
        x_all = torch.randn(world * 3, 16)
        x_all[:, :8] = 0.5  # Self-Routing: every expert's logit ties; expert choice: every token ties
        layer = MoELayer(cfg, ep_group=groups.ep_group)
        layer.load_full_state_dict(ref.state_dict())
        y, info = layer(x_all[rank * 3 : (rank + 1) * 3])
        y_ref, info_ref = ref(x_all)
        out.append(
            (
                info.stats.tokens_per_expert.tolist(),
                info_ref.stats.tokens_per_expert.tolist(),
                _rel(y, y_ref[rank * 3 : (rank + 1) * 3]),
            )
        )
    return out


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_forced_ties_give_one_decision_on_every_rank(dispatcher):
    per_rank = run_distributed(2, _ties, dispatcher)
    for case in range(4):
        decisions = {tuple(r[case][0]) for r in per_rank}
        assert len(decisions) == 1, f"ranks disagree: {decisions}"
        got, ref, rel = per_rank[0][case]
        assert got == ref and rel <= RTOL
    # lower expert index first: top-K takes experts 0 and 1 for all 6 tokens; top-P (mass 0.3 > 1/8 per expert) 0..2
    assert per_rank[0][0][0] == [6, 6, 0, 0, 0, 0, 0, 0]
    assert per_rank[0][1][0] == [6, 6, 6, 0, 0, 0, 0, 0]
    assert per_rank[0][2][0] == [6, 6, 0, 0, 0, 0, 0, 0]
