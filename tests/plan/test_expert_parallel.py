"""The plan against two expert-parallel gloo ranks (one spawn): bytes per collective equal the dispatchers'
counters when the routing is exactly the planned one, and a small decoder's saved activations match the plan.

With every expert scoring one input channel (AoE: Wdown_i reads channel i; router: row i of the weight is e_i),
the tokens decide the routing. Uniform: every rank's 6 tokens select each of the C(4, 2) expert pairs once. Skew
(the hot expert 0 takes 3/8 of the rows): 9 of 12 tokens select expert 0 with each other expert three times, the
other 3 select each pair of {1, 2, 3} once.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from aoe_ep.config import MoEConfig
from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.plan.layout import ep_layer_bytes
from aoe_ep.plan.routing import routing_model

D, N, K, D_LOW = 16, 4, 2, 6
SCORERS = ("aoe", "router")  # Self-Routing moves what the router moves
DISPATCHERS = ("allgather", "alltoall")
ROUTINGS = {"uniform": None, "skew": 0.375}


def _choices(routing: str) -> list[tuple[int, ...]]:
    if routing == "uniform":
        return list(itertools.combinations(range(N), K))
    hot = [(0, e) for e in (1, 2, 3) for _ in range(3)]
    return hot + list(itertools.combinations((1, 2, 3), K))


def _tokens(choices: list[tuple[int, ...]], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(len(choices), D, generator=gen)
    x_TD[:, :N] = 0.5
    for t, experts in enumerate(choices):
        for rank, e in enumerate(experts):
            x_TD[t, e] = 10.0 - rank
    return x_TD


def _counters(rank: int, world: int) -> dict:
    from aoe_ep.moe import MoELayer
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(world)
    out = {}
    for scorer, dispatcher, routing in itertools.product(SCORERS, DISPATCHERS, ROUTINGS):
        cfg = MoEConfig(d_model=D, num_experts=N, top_k=K, d_ffn=8, d_low=D_LOW, scorer=scorer, dispatcher=dispatcher)
        torch.manual_seed(0)
        layer = MoELayer(cfg, ep_group=groups.ep_group)
        with torch.no_grad():
            if scorer == "aoe":
                w_down = layer.scorer.w_down
                w_down.zero_()
                first = layer.expert_offset if layer.scorer_is_sharded else 0
                for i in range(w_down.shape[0]):
                    w_down[i, first + i, 0] = 1.0
            elif scorer == "router":
                layer.scorer.weight.copy_(torch.eye(N, D))
        x = _tokens(_choices(routing), seed=rank).requires_grad_()
        y, _ = layer(x)
        y.square().sum().backward()
        out[(scorer, dispatcher, routing)] = (x.shape[0], layer.dispatcher.counter.as_dict())
    out["activations"] = {dispatcher: _saved_activations(groups, dispatcher) for dispatcher in DISPATCHERS}
    return out


def _saved_activations(groups, dispatcher: str) -> tuple:
    """(config overrides, tokens, rows reaching this rank's experts per layer, saved bytes) of one micro-batch."""
    from aoe_ep.bench.measure import saved_bytes_counter
    from aoe_ep.config import load_config
    from aoe_ep.model import Decoder, token_cross_entropy
    from tests.plan.test_activations import SMALL

    overrides = SMALL + [f"moe.dispatcher={dispatcher}"]
    cfg = load_config("tiny", overrides)
    torch.manual_seed(0)
    model = Decoder(cfg.model, cfg.moe, ep_group=groups.ep_group)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.data.seq_len))
    with saved_bytes_counter(exclude=list(model.parameters())) as saved:
        out = model(tokens)
        ce_sum, count = token_cross_entropy(out.logits, tokens, torch.ones_like(tokens, dtype=torch.float32))
        loss = ce_sum / count + out.aux_loss
    loss.backward()
    mine = slice(model.blocks[0].ffn.expert_offset, model.blocks[0].ffn.expert_offset + cfg.moe.num_experts // 2)
    rows = [float(info.stats.tokens_per_expert[mine].sum()) for info in out.moe]
    return overrides, tokens.numel(), sum(rows) / len(rows), saved[0]


@pytest.fixture(scope="module")
def counted():
    return run_distributed(2, _counters)


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("scorer", SCORERS)
def test_planned_bytes_equal_the_counters(counted, scorer, dispatcher, routing):
    cfg = MoEConfig(d_model=D, num_experts=N, top_k=K, d_ffn=8, d_low=D_LOW, scorer=scorer, dispatcher=dispatcher)
    model = routing_model(N, K, ROUTINGS[routing])
    for rank, per_case in enumerate(counted):
        tokens, measured = per_case[(scorer, dispatcher, routing)]
        planned = ep_layer_bytes(cfg, 2, tokens, 4, model, rank=rank)
        assert set(planned) == set(measured), (rank, planned, measured)
        for name, value in measured.items():
            assert planned[name] == pytest.approx(value, abs=1e-6), (rank, name, planned, measured)
    if routing == "skew":  # the hot expert's rank receives more than the other
        assert counted[0][(scorer, dispatcher, routing)][1] != counted[1][(scorer, dispatcher, routing)][1]


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_activation_bytes_under_expert_parallelism(counted, dispatcher):
    from aoe_ep.config import load_config
    from aoe_ep.plan.activations import MicroBatch, activation_bytes

    for rank, per_case in enumerate(counted):
        overrides, tokens, rows, measured = per_case["activations"][dispatcher]
        cfg = load_config("tiny", overrides)
        uniform = routing_model(cfg.moe.num_experts, cfg.moe.top_k, None)
        returned = (0.0, 0.0)
        if dispatcher == "allgather":  # the combine's row counts at their uniform expectation
            received = tokens * sum(1 - uniform.p_none(q, 2) for q in (0, 1))
            returned = (2 * tokens * (1 - uniform.p_none(rank, 2)), received)
        mb = MicroBatch(
            batch=tokens // cfg.data.seq_len, seq_len=cfg.data.seq_len, compute_bytes=4, autocast=False, device="cpu"
        )
        planned = sum(activation_bytes(cfg, mb, ep=2, expert_rows=rows, returned=returned).values())
        assert planned == pytest.approx(measured, rel=0.10), (rank, planned, measured)
