"""A checkpoint saved at EP 2 (FSDP2, two gloo ranks) exports, read in one process without a process group, to the
same files as the same model in one process: the trainer initialises it bit-identically in every layout, so the
step-0 checkpoints of the two runs export to byte-identical safetensors. After training steps the two runs differ
by the rounding of their reductions (which Adam amplifies where a gradient is near zero), so there the export is
checked against aoe-ep's own evaluation of that EP-2 checkpoint."""

from __future__ import annotations

import torch

from aoe_ep.eval.loading import open_checkpoint
from aoe_ep.hf.export import export_checkpoint
from aoe_ep.parallel.spawn import run_distributed
from tests.train.synthetic import BUILDERS, small_config

# Two 16-token sequences per step: one per rank at EP 2, one micro-batch of both in one process.
COMMON = (
    "train.global_batch_tokens=32",
    "train.max_steps=2",
    "train.save_interval=2",
    "train.eval_interval=100",
    "train.eval_at_start=false",
    "model.vocab_size=257",
)


def _train(cfg) -> None:
    from aoe_ep.train.trainer import Trainer

    with Trainer(cfg, data=BUILDERS) as trainer:
        trainer.save()  # step 0: the initial weights
        trainer.fit()


def _ep2_worker(rank: int, world: int, root) -> None:
    _train(
        small_config(
            root / "ep2",
            *COMMON,
            "parallel.expert_parallel_size=2",
            "train.micro_batch_size=1",
            "train.dense_parallel=fsdp",
        )
    )


def test_ep2_checkpoint_exports_as_the_one_process_model(tmp_path):
    run_distributed(2, _ep2_worker, tmp_path)
    _train(small_config(tmp_path / "one", *COMMON, "train.micro_batch_size=2"))
    files = {}
    for name in ("ep2", "one"):
        export_checkpoint(tmp_path / name / "run" / "checkpoints" / "step_00000000", tmp_path / f"hf_{name}")
        files[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"hf_{name}").iterdir())}
    assert "model.safetensors" in files["ep2"] and files["ep2"] == files["one"]

    export_checkpoint(tmp_path / "ep2" / "run", tmp_path / "hf_trained")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf_trained"), trust_remote_code=True, dtype=torch.float32
    ).eval()
    tokens_BS = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    with open_checkpoint(tmp_path / "ep2" / "run", device="cpu") as loaded, torch.no_grad():
        assert loaded.step == 2
        ours, theirs = loaded.model(tokens_BS).logits, hf(tokens_BS).logits
    assert float((theirs - ours).norm() / ours.norm()) < 1e-5
