"""Checkpoints: a process killed in the middle of a save leaves the previous checkpoint loadable and `latest`
pointing at it; the directory layout, pruning and the errors a user meets on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from aoe_ep.train import checkpoint as ckpt
from aoe_ep.train.trainer import Trainer, train
from tests.train.synthetic import BUILDERS, small_config

REPO = Path(__file__).resolve().parents[2]

# The child trains with a save every 2 steps and blocks inside the save of step 4, at the point named by argv[2],
# after touching a signal file; the test then kills it with SIGKILL. Blocking is done by patching, here, the one
# function of that stage, so that the trainer's code runs unchanged up to the kill.
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch.distributed.checkpoint.filesystem as fs
    from aoe_ep.train import checkpoint as ckpt
    from aoe_ep.train.trainer import train
    from tests.train.synthetic import BUILDERS, small_config

    tmp, point = Path(sys.argv[1]), sys.argv[2]
    signal_file = tmp / "blocked"

    def block():
        signal_file.write_text("x")
        time.sleep(600)

    if point == "writing":  # after the first shard file of step 4 has been written, before the rest and .metadata
        write_item = fs._write_item
        def slow_write_item(*args, **kwargs):
            result = write_item(*args, **kwargs)
            if any(p.name.startswith(".tmp-step_00000004") for p in (tmp / "run" / "checkpoints").iterdir()):
                block()
            return result
        fs._write_item = slow_write_item
    else:  # every shard and .metadata written, not yet renamed into place
        publish = ckpt.publish
        def slow_publish(tmp_dir, final, root):
            if final.name == ckpt.step_name(4):
                block()
            publish(tmp_dir, final, root)
        ckpt.publish = slow_publish
    train(small_config(tmp, "train.max_steps=6", "train.save_interval=2", "train.eval_interval=100"), data=BUILDERS)
""")


@pytest.mark.parametrize("point", ["writing", "publishing"])
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, point):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), point],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "blocked").exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached the save of step 4:\n{child.stdout.read().decode()[-3000:]}")
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()

    root = tmp_path / "run" / "checkpoints"
    tmp_dir = root / ".tmp-step_00000004"
    assert tmp_dir.is_dir() and not (root / "step_00000004").exists()
    assert (root / "latest").read_text().strip() == "step_00000002"
    if point == "writing":
        assert not (tmp_dir / ".metadata").exists()  # killed while the shards were being written

    cfg = small_config(tmp_path, "train.max_steps=6", "train.save_interval=2", "train.eval_interval=100")
    with Trainer(cfg, resume="latest", data=BUILDERS) as trainer:
        assert trainer.step == 2 and trainer.consumed_samples == 2 * trainer.plan.global_samples
        assert not tmp_dir.exists()  # the interrupted save's leftovers are removed on start
        result = trainer.fit()
    assert result.step == 6
    assert (root / "latest").read_text().strip() == "step_00000006"


def test_layout_pruning_logs_and_resume_errors(tmp_path):
    cfg = small_config(tmp_path, "train.max_steps=6", "train.save_interval=2", "train.keep_checkpoints=2")
    result = train(cfg, data=BUILDERS)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert result.checkpoint == root / "step_00000006"
    meta = json.loads((root / "step_00000006" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 1 and meta["consumed_samples"] == 6 * 4
    assert "moe:" in (root / "step_00000006" / "config.yaml").read_text()

    # tensorboard events and the JSON log, with the per-layer MoE statistics
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train_record = next(r for r in records if "train/loss" in r)
    for tag in (
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/peak_memory_gib",
        "moe/idle_time",
        "moe/layer00/ent_load",
        "moe/layer00/ent_conf",
        "moe/layer00/max_minus_min",
        "moe/layer00/load",
        "moe/layer00/score_mean",
        "moe/seconds/expert_max",
    ):
        assert tag in train_record, tag
    assert len(train_record["moe/layer00/load"]) == 4 and sum(train_record["moe/layer00/load"]) == pytest.approx(1.0)
    assert "moe:" in (tmp_path / "run" / "config.yaml").read_text()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 1
    assert [r["step"] for r in records if "valid/loss" in r] == [0, 3, 6]

    # a second fresh run into the same out_dir is refused, naming the fix
    with pytest.raises(ckpt.CheckpointError, match="pass --resume"):
        Trainer(cfg, data=BUILDERS)
    # resuming a finished run trains nothing and leaves its checkpoint as it was
    stamp = (root / "step_00000006" / "meta.json").stat().st_mtime_ns
    again = train(cfg, resume="latest", data=BUILDERS)
    assert again.step == 6 and again.history == []
    assert (root / "step_00000006" / "meta.json").stat().st_mtime_ns == stamp
    # a checkpoint of another architecture is named field by field instead of failing inside DCP
    wider = small_config(tmp_path, "train.max_steps=6", "model.d_model=48", "model.n_heads=2")
    with pytest.raises(ckpt.CheckpointError, match=r"model\.d_model: 32 in the checkpoint, 48 now"):
        Trainer(wider, resume="latest", data=BUILDERS)
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        Trainer(cfg, resume=str(tmp_path / "nowhere"), data=BUILDERS)


def test_resume_without_any_checkpoint_says_so(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint under"):
        Trainer(small_config(tmp_path), resume="latest", data=BUILDERS)


def test_checkpoint_holds_expert_weights_as_ep_sharded_dtensors(tmp_path):
    """What makes a change of EP size loadable: expert tensors are saved sharded on dim 0 over the "ep" mesh
    dimension, dense ones as plain tensors; their global shapes are the single-device ones."""
    result = train(small_config(tmp_path, "train.max_steps=2", "train.save_interval=2"), data=BUILDERS)
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(result.checkpoint)).read_metadata().state_dict_metadata
    d_wide = -(-(3 * 32 * 32 - 8 * 32) // (8 + 2 * 32))  # Eq. 5, rounded up
    assert tuple(metadata["model.blocks.0.ffn.experts.w_up"].size) == (4, 8, d_wide)  # all 4 experts
    assert "optim.state.blocks.0.ffn.experts.w_up.exp_avg" in metadata
    assert "rng_rank0.cpu" in metadata and "progress.consumed_samples" in metadata
    assert torch.Size(metadata["model.embed.weight"].size) == torch.Size([64, 32])


def test_rng_state_is_restored(tmp_path):
    cfg = small_config(tmp_path, "train.max_steps=2", "train.save_interval=2")
    with Trainer(cfg, data=BUILDERS) as trainer:
        torch.rand(100)  # move the generator away from where seeding and initialisation leave it
        trainer.fit()
        saved = torch.get_rng_state()
    torch.manual_seed(999)
    with Trainer(small_config(tmp_path, "train.max_steps=4"), resume="latest", data=BUILDERS):
        assert torch.equal(torch.get_rng_state(), saved)
