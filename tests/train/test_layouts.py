"""One model whatever the layout: the trainer's own initialisation gives bit-identical weights on 1 process and on
4 gloo ranks as DP = 4 (DDP, FSDP2), EP = 2 x DP = 2 (both dispatchers, DDP and FSDP2) and EP = 4, and so the same
step losses as one process whose micro-batch holds an EP group's tokens.

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
LAYOUTS = {  # name: overrides on 4 ranks, single-process micro-batch size with the same losses
    "dp4_ddp": (["train.dense_parallel=ddp"], 1),
    "dp4_fsdp": (["train.dense_parallel=fsdp"], 1),
    "ep2_allgather_fsdp": (["parallel.expert_parallel_size=2", "moe.dispatcher=allgather",
                            "train.dense_parallel=fsdp"], 2),
    "ep2_alltoall_ddp": (["parallel.expert_parallel_size=2", "moe.dispatcher=alltoall"], 2),
    "ep4_allgather": (["parallel.expert_parallel_size=4", "moe.dispatcher=allgather"], 4),
}


def _config(tmp_path, name: str, *overrides: str):
    # Two layers: the dense weights of the second block are built after the first block's expert tensors.
    return small_config(tmp_path / name, "model.n_layers=2", "train.max_steps=3", "train.save_interval=100",
                        "train.eval_interval=100", "train.eval_at_start=false", *overrides)


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


def _run(cfg) -> tuple[dict, list]:
    with Trainer(cfg, data=BUILDERS) as trainer:
        initial = full_state(trainer)
        result = trainer.fit()
    return initial, [(r.loss, r.aux_loss) for r in result.history]


def _worker(rank: int, world: int, tmp_path) -> dict:
    return {name: _run(_config(tmp_path, name, "train.micro_batch_size=1", *overrides))
            for name, (overrides, _) in LAYOUTS.items()}


def test_every_layout_starts_from_one_model_and_follows_one_loss_curve(tmp_path):
    per_rank = run_distributed(4, _worker, tmp_path)
    references = {mbs: _run(_config(tmp_path, f"single_mbs{mbs}", f"train.micro_batch_size={mbs}"))
                  for mbs in sorted({mbs for _, mbs in LAYOUTS.values()})}
    initial = references[1][0]
    for mbs, (state, _) in references.items():  # the micro-batch size does not change the model either
        assert all(torch.equal(state[k], initial[k]) for k in initial), mbs
    assert len({float(t.float().std()) for t in initial.values() if t.ndim >= 2}) > 1  # not one constant
    for rank, results in enumerate(per_rank):
        for name, (state, losses) in results.items():
            assert state.keys() == initial.keys(), name
            for key in initial:
                assert torch.equal(state[key], initial[key]), f"rank {rank} {name}: {key} differs"
            want = references[LAYOUTS[name][1]][1]
            assert len(losses) == len(want) == 3
            for step, ((loss, aux), (ref_loss, ref_aux)) in enumerate(zip(losses, want), start=1):
                assert loss == pytest.approx(ref_loss, rel=RTOL), f"{name} step {step}"
                assert aux == pytest.approx(ref_aux, rel=RTOL), f"{name} step {step}"
    assert references[1][1][-1][0] < references[1][1][0][0]  # the runs trained: the losses are not constants
