"""`parallel.expert_placement: balanced` changes where experts run, not the run: on 2 gloo ranks (EP 2), a run
that resumes a contiguous checkpoint under `balanced` (and re-places again at its own save), and a contiguous run
resumed from that balanced checkpoint, continue the uninterrupted contiguous run: the same losses, parameters and
AdamW moments of every global expert, to float rounding (RTOL, relative to each tensor's largest value). Not bit
for bit: the gradient norm that clipping divides by sums each rank's expert squares before the EP all-reduce, so
another placement groups other experts in that sum (one ulp moves the clip scale, and with it every update); under
`allgather` a rank also adds its experts' outputs before the combine all-to-all. The same under FSDP2 on 4 ranks,
where expert stacks are DTensor shards.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train.optim import is_expert_param
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config

RTOL = 1e-5
DISPATCHERS = ("alltoall", "allgather")


def _config(tmp_path, name: str, dispatcher: str, placement: str):
    # 8 experts over 2 ranks; 2 layers, so that a layer is re-placed whatever the other's load.
    return small_config(
        tmp_path / name,
        "parallel.expert_parallel_size=2",
        f"moe.dispatcher={dispatcher}",
        f"parallel.expert_placement={placement}",
        "moe.num_experts=8",
        "model.n_layers=2",
        "train.max_steps=8",
        "train.save_interval=3",
        "train.eval_interval=100",
        "train.eval_at_start=false",
    )


def _global(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter and AdamW moment by global expert: the EP ranks' stacks gathered and put in expert order by
    each layer's placement (collective)."""
    group = trainer.runtime.groups.ep_group
    owner = {}
    for prefix, layer in trainer.dp.model.named_modules():
        if hasattr(layer, "placement"):
            for name, _p in layer.named_parameters():
                owner[f"{prefix}.{name}"] = layer.placement.order
    out = {}
    for name, p in trainer.dp.model.named_parameters():
        tensors = {"param": p.detach(), **{k: v for k, v in trainer.optimizer.state[p].items() if v.ndim > 0}}
        for key, t in tensors.items():
            t = t.full_tensor() if isinstance(t, DTensor) else t  # an FSDP2 shard: the rank's whole stack
            if is_expert_param(p):
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, t.contiguous(), group=group)
                full = torch.empty((len(owner[name]),) + tuple(t.shape[1:]), dtype=t.dtype)
                full[owner[name]] = torch.cat(parts)
                t = full
            out[f"{name}/{key}"] = t.clone()
    return out


def _run(cfg, resume=None) -> dict:
    with Trainer(cfg, resume=resume, data=BUILDERS) as trainer:
        result = trainer.fit()
        return {
            "losses": [(r.loss, r.aux_loss, r.grad_norm) for r in result.history],
            "state": _global(trainer),
            "placements": [layer.placement.as_lists() for layer in trainer.moe_layers],
        }


def _worker(rank: int, world: int, tmp_path) -> dict:
    out = {}
    for dispatcher in DISPATCHERS:
        a = _run(_config(tmp_path, f"{dispatcher}_a", dispatcher, "contiguous"))
        step3 = tmp_path / f"{dispatcher}_a" / "run" / "checkpoints" / "step_00000003"
        b = _run(_config(tmp_path, f"{dispatcher}_b", dispatcher, "balanced"), resume=str(step3))
        step6 = tmp_path / f"{dispatcher}_b" / "run" / "checkpoints" / "step_00000006"
        c = _run(_config(tmp_path, f"{dispatcher}_c", dispatcher, "contiguous"), resume=str(step6))
        out[dispatcher] = {
            "a": a,
            "b": b,
            "c": c,
            "meta3": json.loads((step3 / "meta.json").read_text()),
            "meta6": json.loads((step6 / "meta.json").read_text()),
        }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(2, _worker, tmp_path_factory.mktemp("placement"))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs().max() <= RTOL * b.abs().max().clamp_min(1e-12)).item()) if b.numel() else True


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_balanced_resume_continues_the_contiguous_run(runs, dispatcher):
    for rank, per_rank in enumerate(runs):
        r = per_rank[dispatcher]
        a, b, c = r["a"], r["b"], r["c"]
        # the checkpoints record the load they were chosen from and the placement of the steps before them
        assert r["meta3"]["expert_placement"] == {"mode": "contiguous", "layers": [[[0, 1, 2, 3], [4, 5, 6, 7]]] * 2}
        assert r["meta3"]["expert_load"]["steps"] == 3 and r["meta6"]["expert_load"]["since_step"] == 3
        load = r["meta3"]["expert_load"]
        assert all(sum(row) == 3 * 64 * 2 for row in load["tokens_per_expert"])  # 3 steps x 64 tokens x top-2
        # recency-weighted (half-life 10 steps): between the last step's counts and the plain sum, per layer
        assert load["half_life_steps"] == 10.0
        assert all(64 * 2 < sum(row) < 3 * 64 * 2 for row in load["recent_tokens_per_expert"])
        assert r["meta6"]["expert_placement"]["mode"] == "balanced"
        assert r["meta6"]["expert_placement"]["layers"] != r["meta3"]["expert_placement"]["layers"]  # re-placed
        assert c["placements"] == [[[0, 1, 2, 3], [4, 5, 6, 7]]] * 2
        for step, (want, got_b) in enumerate(zip(a["losses"][3:], b["losses"]), start=4):
            for x, y in zip(got_b, want):
                assert x == pytest.approx(y, rel=RTOL), f"{dispatcher} rank {rank} step {step}"
        for want, got_c in zip(a["losses"][6:], c["losses"]):
            for x, y in zip(got_c, want):
                assert x == pytest.approx(y, rel=RTOL), f"{dispatcher} rank {rank} c"
        for run_name, run in (("balanced", b), ("back to contiguous", c)):
            assert run["state"].keys() == a["state"].keys()
            for key in a["state"]:
                assert _close(run["state"][key], a["state"][key]), f"{dispatcher} {run_name}: {key}"


def test_recent_load_halves_a_step_s_weight_every_half_life():
    from aoe_ep.train.placement import ExpertLoad

    load = ExpertLoad(num_layers=1, num_experts=2, half_life=2.0)
    for counts in ([8, 0], [0, 8], [0, 8]):  # one step's [L, n] counts each
        load.add(torch.tensor([counts], dtype=torch.float64))
    assert load.counts_LE.tolist() == [[8.0, 16.0]] and load.steps == 3
    # expert 0's counts are 2 steps old (weight 0.5), expert 1's 1 and 0 steps old (2 ** -0.5 and 1)
    assert load.recent_LE[0].tolist() == pytest.approx([4.0, 8 * 2**-0.5 + 8])


def _fsdp_worker(rank: int, world: int, tmp_path) -> dict:
    def config(name, placement):
        return small_config(
            tmp_path / name,
            "parallel.expert_parallel_size=2",
            "moe.dispatcher=allgather",
            f"parallel.expert_placement={placement}",
            "moe.num_experts=8",
            "train.max_steps=5",
            "train.save_interval=3",
            "train.eval_interval=100",
            "train.eval_at_start=false",
            "train.dense_parallel=fsdp",
            "train.micro_batch_size=1",
        )

    a = _run(config("a", "contiguous"))
    b = _run(config("b", "balanced"), resume=str(tmp_path / "a" / "run" / "checkpoints" / "step_00000003"))
    return {"a": a, "b": b}


def test_fsdp2_expert_shards_follow_their_experts(tmp_path):
    """FSDP2 x EP 2 x expert-DP 2 on 4 ranks: a rank's expert stack is a DTensor shard over the expert-DP group;
    re-placing gathers it, moves the experts and cuts the same shard again."""
    for r in run_distributed(4, _fsdp_worker, tmp_path):
        a, b = r["a"], r["b"]
        assert b["placements"] != [[[0, 1, 2, 3], [4, 5, 6, 7]]]
        for want, got in zip(a["losses"][3:], b["losses"]):
            assert got == pytest.approx(want, rel=RTOL)
        for key in a["state"]:
            assert _close(b["state"][key], a["state"][key]), key
