"""The plan's FLOPs agree with the trainer's model-FLOPs count; the routing model is uniform top-K at S = 1/n and
puts the asked-for share on the hot expert otherwise."""

from __future__ import annotations

import itertools
from math import comb

import pytest

from aoe_ep.config import load_config
from aoe_ep.plan.flops import step_flops
from aoe_ep.plan.routing import routing_model
from aoe_ep.train.flops import train_flops_per_token


@pytest.mark.parametrize("preset", ["paper/aoe_4b", "paper/moe_4b", "self_routing_732m", "tiny"])
def test_uniform_step_flops_are_the_trainers_model_flops(preset):
    cfg = load_config(preset)
    tokens = 4096
    rows = tokens * cfg.moe.top_k
    planned = sum(step_flops(cfg, tokens, rows).values())
    assert planned == pytest.approx(train_flops_per_token(cfg, cfg.data.seq_len) * tokens, rel=1e-12)


def test_expert_flops_follow_the_rows_a_rank_receives():
    cfg = load_config("paper/aoe_4b")
    base, hot = step_flops(cfg, 1000, 2000), step_flops(cfg, 1000, 3000)
    assert hot["experts"] == pytest.approx(1.5 * base["experts"]) and hot["attention"] == base["attention"]


@pytest.mark.parametrize("n,k,ep", [(8, 2, 2), (8, 2, 4), (8, 3, 8), (16, 4, 4)])
def test_uniform_routing_is_uniform_top_k(n, k, ep):
    model = routing_model(n, k, None)
    n_local = n // ep
    for rank in range(ep):
        assert model.p_none(rank, ep) == pytest.approx(comb(n - n_local, k) / comb(n, k))
        assert model.rank_rows_per_token(rank, ep) == pytest.approx(k * n_local / n)


def test_skewed_routing_by_enumeration():
    """n = 6, K = 2, S = 0.3: enumerate the model's token population and count."""
    n, k, share, ep = 6, 2, 0.3, 3
    model = routing_model(n, k, share)
    h = share * k
    population = [({0, e}, h / (n - 1)) for e in range(1, n)]
    population += [(set(c), (1 - h) / comb(n - 1, k)) for c in itertools.combinations(range(1, n), k)]
    assert sum(w for _, w in population) == pytest.approx(1.0)
    assert sum(w for c, w in population if 0 in c) == pytest.approx(share * k)
    for rank in range(ep):
        mine = set(range(rank * 2, rank * 2 + 2))
        assert model.p_none(rank, ep) == pytest.approx(sum(w for c, w in population if not c & mine))
        assert model.rank_rows_per_token(rank, ep) == pytest.approx(sum(w * len(c & mine) for c, w in population))


def test_impossible_shares_are_refused():
    with pytest.raises(ValueError, match="hot-expert-share"):
        routing_model(8, 2, 0.6)
