"""One model whatever the layout, and expert state that shrinks with the expert-DP size, on 4 gloo ranks against
single-process runs (one spawn runs every layout):

- the trainer's own initialisation gives bit-identical weights on 1 process and as DP = 4 (DDP, FSDP2),
  EP = 2 x DP = 2 (both dispatchers, DDP and FSDP2) and EP = 4, and so the same step losses as one process whose
  micro-batch holds an EP group's tokens;
- each rank's optimizer holds exactly 2 fp32 moments per element it owns, plus AdamW's 4-byte step per tensor:
  under FSDP2 dense parameters are sharded over the world and expert parameters over EP x expert-DP; under DDP
  dense ones are replicated and expert ones sharded over EP only;
- checkpoints move between FSDP2 x EP and one process, both ways; gradient accumulation under FSDP2 x EP (two
  micro-batches per step) reaches the single-process losses too.

With 4 ranks and a global batch of 4 sequences each rank reads one sequence per step. An EP group of 2 sees two
sequences at once: the single-process run with micro-batches of 2 (two of them per step). EP = 4 sees all four: one
micro-batch of 4. DP = 4 with EP = 1: micro-batches of 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train.optim import is_expert_param
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config

RTOL = 2e-5
WORLD = 4
EP2 = ["parallel.expert_parallel_size=2"]
ACCUMULATE = ("train.global_batch_tokens=128",)  # 8 sequences: 2 micro-batches per rank and step
LAYOUTS = {  # name: (overrides on 4 ranks, EP size, the single-process run with the same losses)
    "dp4_ddp": (["train.dense_parallel=ddp"], 1, (1,)),
    "dp4_fsdp": (["train.dense_parallel=fsdp"], 1, (1,)),
    "ep2_allgather_fsdp": (EP2 + ["moe.dispatcher=allgather", "train.dense_parallel=fsdp"], 2, (2,)),
    "ep2_alltoall_fsdp": (EP2 + ["moe.dispatcher=alltoall", "train.dense_parallel=fsdp"], 2, (2,)),
    "ep2_alltoall_ddp": (EP2 + ["moe.dispatcher=alltoall"], 2, (2,)),
    "ep4_allgather_fsdp": (
        ["parallel.expert_parallel_size=4", "moe.dispatcher=allgather", "train.dense_parallel=fsdp"],
        4,
        (4,),
    ),
    "ep2_alltoall_fsdp_accumulating": (
        EP2 + ["moe.dispatcher=alltoall", "train.dense_parallel=fsdp", *ACCUMULATE],
        2,
        (2, *ACCUMULATE),
    ),
}
RESUMED = "ep2_allgather_fsdp_from_one"  # 4 ranks, FSDP2 x EP 2, from the single-process step-3 checkpoint


def _config(tmp_path, name: str, *overrides: str):
    # Two layers: the dense weights of the second block are built after the first block's expert tensors.
    return small_config(
        tmp_path / name,
        "model.n_layers=2",
        "train.max_steps=5",
        "train.save_interval=3",
        "train.eval_interval=100",
        "train.eval_at_start=false",
        *overrides,
    )


def _single(ref: tuple) -> str:
    """The directory of the single-process run (micro-batch size, overrides...)."""
    return "single_" + "_".join(str(part).replace("=", "-") for part in ref)


def _step3(tmp_path, name: str) -> str:
    return str(tmp_path / name / "run" / "checkpoints" / "step_00000003")


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter as the single-device model holds it: FSDP2 shards gathered, expert shards concatenated
    over the EP group (collective)."""
    state = {}
    for name, p in trainer.dp.model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        group = trainer.runtime.groups.ep_group
        if is_expert_param(p) and group is not None and dist.get_world_size(group) > 1:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts)
        state[name] = t.clone()
    return state


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (its local shards of DTensor state)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if isinstance(value, DTensor) else value
                total += local.numel() * local.element_size()
    return total


def _run(cfg, resume=None) -> dict:
    with Trainer(cfg, resume=resume, data=BUILDERS) as trainer:
        initial = full_state(trainer) if resume is None else {}
        experts = {name for name, p in trainer.dp.model.named_parameters() if is_expert_param(p)}
        result = trainer.fit()
        return {
            "initial": initial,
            "losses": [(r.loss, r.aux_loss) for r in result.history],
            "experts": experts,
            "optimizer_bytes": optimizer_bytes(trainer.optimizer),
        }


def _worker(rank: int, world: int, tmp_path, single_step3: str) -> dict:
    out = {
        name: _run(_config(tmp_path, name, "train.micro_batch_size=1", "train.exit_at_step=3", *overrides))
        for name, (overrides, _, _) in LAYOUTS.items()
    }
    overrides = LAYOUTS["ep2_allgather_fsdp"][0]
    out[RESUMED] = _run(_config(tmp_path, RESUMED, "train.micro_batch_size=1", *overrides), resume=single_step3)
    return out


def expected_optimizer_bytes(shapes: dict[str, torch.Size], experts: set[str], world: int, ep: int, fsdp: bool) -> int:
    """2 fp32 moments per element a rank owns + AdamW's fp32 step per tensor (the model `aoe-ep plan` uses)."""
    elements = 0
    for name, shape in shapes.items():
        share = (world if fsdp else ep) if name in experts else (world if fsdp else 1)
        assert shape.numel() % share == 0, name  # this test's dimensions split evenly
        elements += shape.numel() // share
    return 2 * 4 * elements + 4 * len(shapes)


def _assert_losses(got, want, name):
    assert len(got) == len(want), name
    for step, ((loss, aux), (ref_loss, ref_aux)) in enumerate(zip(got, want), start=1):
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"{name} step {step}"
        assert aux == pytest.approx(ref_aux, rel=RTOL), f"{name} step {step}"


def test_every_layout_is_one_model_with_sharded_expert_state(tmp_path):
    references = {
        ref: _run(_config(tmp_path, _single(ref), f"train.micro_batch_size={ref[0]}", *ref[1:]))
        for ref in {ref for _, _, ref in LAYOUTS.values()}
    }
    per_rank = run_distributed(WORLD, _worker, tmp_path, _step3(tmp_path, _single((2,))))

    initial = references[(1,)]["initial"]
    shapes = {name: t.shape for name, t in initial.items()}
    for key, run in references.items():  # the micro-batch size does not change the model either
        assert all(torch.equal(run["initial"][k], initial[k]) for k in initial), key
    assert len({float(t.float().std()) for t in initial.values() if t.ndim >= 2}) > 1  # not one constant
    assert references[(1,)]["losses"][-1][0] < references[(1,)]["losses"][0][0]  # the runs trained

    for rank, results in enumerate(per_rank):
        for name, (overrides, ep, ref) in LAYOUTS.items():
            got = results[name]
            assert got["initial"].keys() == initial.keys(), name
            for key in initial:
                assert torch.equal(got["initial"][key], initial[key]), f"rank {rank} {name}: {key} differs"
            _assert_losses(got["losses"], references[ref]["losses"][:3], f"rank {rank} {name}")
            fsdp = "train.dense_parallel=fsdp" in overrides
            want = expected_optimizer_bytes(shapes, got["experts"], WORLD, ep, fsdp)
            assert got["optimizer_bytes"] == want, f"rank {rank} {name}"
        _assert_losses(results[RESUMED]["losses"], references[(2,)]["losses"][3:], f"rank {rank} {RESUMED}")

    # AoE's Wdown is sharded with the experts under allgather, replicated over EP (so dense) under alltoall
    assert "blocks.0.ffn.scorer.w_down" in per_rank[0]["ep2_allgather_fsdp"]["experts"]
    assert "blocks.0.ffn.scorer.w_down" not in per_rank[0]["ep2_alltoall_fsdp"]["experts"]

    # and back to one process from the FSDP2 x EP 2 checkpoint
    resumed = _run(
        _config(tmp_path, "single_from_fsdp_ep2", "train.micro_batch_size=2"),
        resume=_step3(tmp_path, "ep2_allgather_fsdp"),
    )
    _assert_losses(resumed["losses"], references[(2,)]["losses"][3:], "one process from FSDP2 x EP 2")


ERC = ("moe.scorer=router", "moe.erc_loss_coeff=1.0")  # the routed MoE with the ERC loss


def _erc_worker(rank: int, world: int, tmp_path) -> dict:
    return {
        disp: _run(
            _config(tmp_path, f"erc_ep2_{disp}", "train.micro_batch_size=1", *EP2, f"moe.dispatcher={disp}", *ERC)
        )["losses"]
        for disp in ("allgather", "alltoall")
    }


def test_erc_loss_trains_alike_under_expert_parallelism(tmp_path):
    """EP 2 (DDP) on 2 ranks (each rank's 2 sequences in 2 micro-batches) against one process with micro-batches
    of 2: the same step losses and aux losses (the ERC term included, its noise drawn alike on every rank), so the
    ERC gradients reach the sharded experts and the replicated router as on one device."""
    want = _run(_config(tmp_path, "erc_single", "train.micro_batch_size=2", *ERC))["losses"]
    per_rank = run_distributed(2, _erc_worker, tmp_path)
    assert want[-1][0] < want[0][0]
    for rank, results in enumerate(per_rank):
        for disp, got in results.items():
            _assert_losses(got, want, f"rank {rank} {disp} with ERC")
