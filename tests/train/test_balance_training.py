"""`moe.balance: bias` in training: the bias moves after every applied step from the step's global counts, is logged,
survives checkpoints (a resumed run equals the uninterrupted one bit for bit), and on 2 gloo ranks at EP 2 (both
dispatchers; DDP, which broadcasts buffers, and FSDP2) it is the same on every rank and equal to one process's,
as are the outputs and gradients of a layer with a bias; replicas that drift apart stop every rank at a save."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, run_recording, small_config

BIAS = ("moe.balance=bias", "moe.balance_rate=0.01", "model.n_layers=2")
RTOL = 2e-5
LEAN = ("train.max_steps=4", "train.save_interval=4", "train.eval_interval=100", "train.eval_at_start=false")
EP_RUNS = {
    "allgather_ddp": ("moe.dispatcher=allgather", "train.dense_parallel=ddp"),
    "alltoall_fsdp": ("moe.dispatcher=alltoall", "train.dense_parallel=fsdp"),
}


def _biases(trainer: Trainer) -> list[torch.Tensor]:
    return [layer.expert_bias.clone() for layer in trainer.moe_layers if layer.cfg.balance == "bias"]


def _run(cfg, resume=None) -> dict:
    return run_recording(cfg, _biases, "biases", resume)


def test_bias_moves_is_logged_and_resumes_bit_identically(tmp_path):
    full = _run(small_config(tmp_path / "full", *BIAS))
    first = _run(small_config(tmp_path / "split", *BIAS, "train.exit_at_step=3"))
    second = _run(small_config(tmp_path / "split", *BIAS), resume="latest")

    # the checkpoint carries the bias: the resumed trainer starts from step 3's
    for saved, loaded in zip(first["biases"], second["loaded"]):
        assert torch.equal(saved, loaded) and saved.abs().max() > 0
    for a, b in zip(full["history"], first["history"] + second["history"]):
        assert (a.loss, a.aux_loss, a.grad_norm) == (b.loss, b.aux_loss, b.grad_norm)
        assert a.aux_loss == 0.0  # top-K under `bias`: no load-balancing loss
    assert full["evals"][-1] == second["evals"][-1]
    assert full["state"].keys() == second["state"].keys()
    assert all(torch.equal(full["state"][k], second["state"][k]) for k in full["state"])
    assert "blocks.1.ffn.expert_bias" in full["state"]

    # 6 steps at rate 0.01: each bias is a multiple of the rate, at most 6 of them; logged each step
    for bias in full["biases"]:
        steps = bias / 0.01
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 6
    records = [json.loads(line) for line in (tmp_path / "full" / "run" / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if "moe/layer01/bias" in r]
    assert len(logged) == 6 and logged[-1]["moe/layer01/bias"] == full["biases"][1].tolist()
    assert logged[-1]["moe/layer01/bias_max_abs"] == float(full["biases"][1].abs().max())


def _layer_case(rank: int, dispatcher: str, scorer: str, selection: str, ep_group) -> dict:
    """A layer with a nonzero bias at EP 2 against the single-device layer on both ranks' tokens."""
    from aoe_ep.config import MoEConfig
    from aoe_ep.moe import MoELayer

    cfg = MoEConfig(
        d_model=16,
        num_experts=8,
        top_k=2,
        d_ffn=12,
        d_low=6,
        scorer=scorer,
        selection=selection,
        dispatcher=dispatcher,
        balance="bias",
    )
    torch.manual_seed(7)
    ref = MoELayer(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(2.0)
        ref.expert_bias.copy_(torch.linspace(-1.5, 1.5, 8).roll(3))
    xs, gs = [torch.randn(n, 16) for n in (5, 7)], [torch.randn(n, 16) for n in (5, 7)]
    x_all = torch.cat(xs).requires_grad_()
    y_ref, info_ref = ref(x_all)
    ((y_ref * torch.cat(gs)).sum() + info_ref.aux_loss).backward()
    with torch.no_grad():
        bias = ref.expert_bias.clone()
        ref.expert_bias.zero_()
        unbiased = ref(x_all)[1].stats.tokens_per_expert
        ref.expert_bias.copy_(bias)

    layer = MoELayer(cfg, ep_group=ep_group)
    layer.load_full_state_dict(ref.state_dict())  # the bias is replicated: every rank keeps all n
    x = xs[rank].clone().requires_grad_()
    y, info = layer(x)
    ((y * gs[rank]).sum() + info.aux_loss).backward()
    mine = slice(0, 5) if rank == 0 else slice(5, 12)
    errors = {"y": (y - y_ref[mine]).abs().max(), "x.grad": (x.grad - x_all.grad[mine]).abs().max()}
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        if getattr(p, "expert_parallel", False):
            want, got = ref_params[name].grad[layer.expert_offset : layer.expert_offset + 4], p.grad
        else:
            want, got = ref_params[name].grad, p.grad.clone()
            dist.all_reduce(got, group=ep_group)
        errors[f"grad.{name}"] = (got - want).abs().max() / want.abs().max()
    return {
        "errors": {k: float(v) for k, v in errors.items()},
        "counts": info.stats.tokens_per_expert.tolist(),
        "ref_counts": info_ref.stats.tokens_per_expert.tolist(),
        "unbiased_counts": unbiased.tolist(),
    }


def _worker(rank: int, world: int, tmp_path) -> dict:
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(2)
    layers = {
        (disp, scorer, sel): _layer_case(rank, disp, scorer, sel, groups.ep_group)
        for disp in ("allgather", "alltoall")
        for scorer, sel in (("aoe", "top_k"), ("router", "top_p"))
    }
    runs = {}
    for name, overrides in EP_RUNS.items():
        out = _run(
            small_config(
                tmp_path / name, *BIAS, *LEAN, "parallel.expert_parallel_size=2", "train.micro_batch_size=1", *overrides
            )
        )
        runs[name] = {"biases": out["biases"], "losses": [r.loss for r in out["history"]]}
    # the check a save runs: replicas that agree pass, one that drifted by one ulp stops every rank
    from aoe_ep.train.consistency import check_replicas_agree
    from aoe_ep.train.guards import TrainingError

    same = torch.linspace(-1.0, 1.0, 4)
    check_replicas_agree({"a": same, "b": same})
    try:
        check_replicas_agree({"a": same, "b": same if rank == 0 else torch.nextafter(same, same + 1)})
        refused = None
    except TrainingError as err:
        refused = str(err)
    return {"layers": layers, "runs": runs, "refused": refused}


def test_bias_under_expert_parallelism_equals_one_device(tmp_path):
    single = _run(small_config(tmp_path / "single", *BIAS, *LEAN))
    per_rank = run_distributed(2, _worker, tmp_path)

    for rank, results in enumerate(per_rank):
        for case, got in results["layers"].items():
            assert got["counts"] == got["ref_counts"], (rank, case)
            assert got["counts"] != got["unbiased_counts"], (rank, case)  # the bias changed the decisions
            for what, err in got["errors"].items():  # fp32: a few ulps of the largest entry (2^-16 seen on AMD EPYC)
                assert err < 5e-5, (rank, case, what, err)
        for name, run in results["runs"].items():
            assert run["losses"] == pytest.approx([r.loss for r in single["history"]], rel=RTOL), (rank, name)
            for got, want, other in zip(run["biases"], single["biases"], per_rank[1 - rank]["runs"][name]["biases"]):
                assert torch.equal(got, want) and torch.equal(got, other), (rank, name)

    assert per_rank[0]["refused"] == per_rank[1]["refused"]
    assert per_rank[0]["refused"].startswith("b differs from rank 0's on rank 1 -- ")

    # the EP 2 checkpoint (step 4, DDP) loads its bias into one process
    with Trainer(small_config(tmp_path / "allgather_ddp", *BIAS, *LEAN), resume="latest", data=BUILDERS) as trainer:
        assert all(torch.equal(a, b) for a, b in zip(_biases(trainer), single["biases"]))


def test_checkpoint_from_before_moe_balance_resumes_as_aux_and_not_as_bias(tmp_path):
    """A checkpoint whose config.yaml predates `moe.balance` reads as the default `aux`: it resumes under `aux` and
    is refused, naming the field, under `bias` (whose buffers it lacks)."""
    import yaml

    from aoe_ep.train.checkpoint import CheckpointError
    from aoe_ep.train.checkpoint_integrity import file_sha256

    lean = ("train.max_steps=2", "train.save_interval=2", "train.eval_at_start=false")
    _run(small_config(tmp_path, *lean))
    path = tmp_path / "run" / "checkpoints" / "step_00000002"
    saved = yaml.safe_load((path / "config.yaml").read_text())
    del saved["moe"]["balance"], saved["moe"]["balance_rate"]
    (path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"]["config.yaml"] = file_sha256(path / "config.yaml").hex()
    (path / "meta.json").write_text(json.dumps(meta))

    with Trainer(small_config(tmp_path, *lean), resume="latest", data=BUILDERS) as trainer:
        assert trainer.step == 2
    with pytest.raises(CheckpointError, match=r"moe\.balance: 'aux' in the checkpoint, 'bias' now"):
        Trainer(small_config(tmp_path, *lean, "moe.balance=bias"), resume="latest", data=BUILDERS)
