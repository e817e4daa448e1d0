"""AoE diagnostics: dead experts and wasted precompute from known counts; top-K churn on a probe batch is 0 when
nothing changed and 1 when every selection did, the same on one process as on EP = 2 (both dispatchers); the
trainer logs the new keys, and a resumed run logs the churn of the uninterrupted one (or none at its first log)."""

from __future__ import annotations

import json

import pytest
import torch

from aoe_ep.config import TrainConfig
from aoe_ep.moe import LoadStats
from aoe_ep.parallel.runtime import setup_runtime, teardown
from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train.diagnostics import ChurnProbe, diagnostic_scalars
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, SyntheticDataset, small_config

SCORERS = ("aoe", "router", "self_routing")
DISPATCHERS = ("allgather", "alltoall")
PROBE_SAMPLES = 4


def test_dead_experts_and_wasted_precompute_from_known_counts():
    counts = [torch.tensor([7, 0, 5, 0]), torch.tensor([3, 3, 3, 3])]
    stats = [
        LoadStats.from_counts(
            c,
            torch.tensor(0.0),
            torch.zeros(4),
            num_tokens=6,
            margin_sum=torch.tensor(1.5),
            margin_tokens=torch.tensor(6),
        )
        for c in counts
    ]
    tags = diagnostic_scalars(stats, "aoe", churn=[0.25, 0.0])
    assert tags["moe/layer00/dead_experts"] == 2 and tags["moe/layer01/dead_experts"] == 0
    assert tags["moe/dead_experts"] == 2
    assert tags["moe/layer00/wasted_precompute"] == pytest.approx((6 * 4 - 12) / 24)
    assert tags["moe/layer00/score_margin"] == pytest.approx(0.25)
    assert tags["moe/layer00/churn"] == 0.25
    others = diagnostic_scalars(stats, "router", churn=None)  # no precompute, no churn yet
    assert not any(k.endswith(("wasted_precompute", "churn")) for k in others)
    no_margin = LoadStats.from_counts(counts[0], torch.tensor(0.0), torch.zeros(4), num_tokens=6)
    assert "moe/layer00/score_margin" not in diagnostic_scalars([no_margin], "aoe", None)


def _model(scorer: str, dispatcher: str, ep_group=None):
    from aoe_ep.model import Decoder, init_parameters

    cfg = small_config("/unused", "model.n_layers=2", f"moe.scorer={scorer}", f"moe.dispatcher={dispatcher}")
    model = Decoder(cfg.model, cfg.moe, ep_group=ep_group)
    init_parameters(model, seed=3)
    return model


def _flip_first_layer(state: dict, scorer: str) -> None:
    """Change every token's expert set in the first MoE layer (4 experts, top-2): AoE's norms move to the next
    expert; router and Self-Routing logits change sign, so the two lowest win."""
    if scorer == "aoe":
        state["blocks.0.ffn.scorer.w_down"] = state["blocks.0.ffn.scorer.w_down"].roll(1, dims=0)
    elif scorer == "router":
        state["blocks.0.ffn.scorer.weight"] = -state["blocks.0.ffn.scorer.weight"]
    else:  # the logits are the first n channels of RMSNorm(h)·weight
        state["blocks.0.ffn_norm.weight"] = state["blocks.0.ffn_norm.weight"].clone()
        state["blocks.0.ffn_norm.weight"][:4] *= -1


def _load_full(model, state: dict) -> None:
    """Set `model` (any EP size) to the single-device parameters `state`: expert tensors keep this rank's slice."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = state[name]
            if p.shape != full.shape:  # sharded over experts along dim 0
                rank = torch.distributed.get_rank() % (full.shape[0] // p.shape[0])
                full = full[rank * p.shape[0] : (rank + 1) * p.shape[0]]
            p.copy_(full)


def _churn_sequence(scorer: str, dispatcher: str, ep_group, samples: range) -> list:
    """Churn at three probes after the first: nothing changed, a small perturbation, the first layer flipped."""
    from aoe_ep.moe import MoELayer

    reference = _model(scorer, dispatcher)
    state = {k: v.detach().clone() for k, v in reference.named_parameters()}
    model = _model(scorer, dispatcher, ep_group)
    _load_full(model, state)
    data = SyntheticDataset(16, PROBE_SAMPLES, seed=5, salt=1)
    probe = ChurnProbe([torch.stack([data[i]["tokens"] for i in samples])])
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    out = [probe.update(model, layers)]
    out.append(probe.update(model, layers))
    gen = torch.Generator().manual_seed(11)
    for name in sorted(state):
        state[name] = state[name] + 0.2 * state[name].std().nan_to_num() * torch.randn(state[name].shape, generator=gen)
    _load_full(model, state)
    out.append(probe.update(model, layers))
    _flip_first_layer(state, scorer)
    _load_full(model, state)
    out.append(probe.update(model, layers))
    assert model.training
    with torch.no_grad():  # the probe's recording context ends with it: a plain forward records no selection
        assert all(info.mask_TE is None for info in model(probe.tokens[0]).moe)
    return out


def _ep2(rank: int, world: int) -> dict:
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(world)
    share = PROBE_SAMPLES // world
    out = {
        (scorer, dispatcher): _churn_sequence(
            scorer, dispatcher, groups.ep_group, range(rank * share, (rank + 1) * share)
        )
        for scorer in SCORERS
        for dispatcher in DISPATCHERS
    }
    return out


def test_churn_is_zero_then_one_and_the_same_on_ep2():
    rt = setup_runtime(TrainConfig(), expert_parallel_size=1)
    try:
        single = {scorer: _churn_sequence(scorer, "allgather", None, range(PROBE_SAMPLES)) for scorer in SCORERS}
    finally:
        teardown(rt)
    for scorer, (first, unchanged, perturbed, flipped) in single.items():
        assert first is None
        assert unchanged == [0.0, 0.0], scorer
        assert flipped[0] == 1.0, scorer
        assert any(0.0 < c < 1.0 for c in perturbed + flipped[1:]), (scorer, perturbed, flipped)
    per_rank = run_distributed(2, _ep2)
    for (scorer, dispatcher), got in per_rank[0].items():
        assert got == per_rank[1][(scorer, dispatcher)], (scorer, dispatcher)
        assert got[0] is None
        for a, b in zip(got[1:], single[scorer][1:]):
            assert a == pytest.approx(b, abs=1e-12), (scorer, dispatcher, got, single[scorer])


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _train(cfg, resume=None) -> None:
    with Trainer(cfg, resume=resume, data=BUILDERS) as trainer:
        trainer.fit()


def test_trainer_logs_the_diagnostics_and_resumes_their_churn(tmp_path):
    full = small_config(tmp_path / "full", "train.max_steps=6", "train.eval_interval=100", "train.save_interval=2")
    _train(full)
    records = [r for r in _log(tmp_path / "full" / "run") if "moe/dead_experts" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {
            "moe/layer00/score_margin",
            "moe/layer00/churn",
            "moe/layer00/dead_experts",
            "moe/layer00/wasted_precompute",
        } <= r.keys()
        assert r["moe/layer00/score_margin"] > 0 and 0.0 <= r["moe/layer00/churn"] <= 1.0
        assert r["moe/layer00/wasted_precompute"] == pytest.approx(0.5)  # top-2 of 4 experts
    assert any(r["moe/layer00/churn"] > 0 for r in records)  # the selections moved while training
    churn = {r["step"]: r["moe/layer00/churn"] for r in records}
    checkpoints = tmp_path / "full" / "run" / "checkpoints"

    # resumed at a log step (log_interval 1): the same churn as the uninterrupted run
    resumed = small_config(tmp_path / "resumed", "train.max_steps=6", "train.eval_interval=100")
    _train(resumed, resume=str(checkpoints / "step_00000002"))
    again = {r["step"]: r["moe/layer00/churn"] for r in _log(tmp_path / "resumed" / "run") if "moe/dead_experts" in r}
    assert again == pytest.approx({s: churn[s] for s in (3, 4, 5, 6)}, abs=1e-12)

    # resumed between two log steps (log_interval 5, from step 4): no churn at the first log, churn after it
    odd = small_config(tmp_path / "odd", "train.max_steps=6", "train.eval_interval=100", "train.log_interval=5")
    _train(odd, resume=str(checkpoints / "step_00000004"))
    logged = [r for r in _log(tmp_path / "odd" / "run") if "moe/dead_experts" in r]
    assert [r["step"] for r in logged] == [5, 6]
    assert "moe/layer00/churn" not in logged[0] and "moe/layer00/churn" in logged[1]
