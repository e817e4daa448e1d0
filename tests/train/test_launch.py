"""The launch scripts: `launch/cpu_demo.sh` runs `torchrun --nproc-per-node 2` on gloo and trains the tiny model end
to end (slow: two fresh processes); the others at least parse."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.train.conftest import real_corpus_overrides

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["demo.sh", "cpu_demo.sh", "train.sh", "train_multinode.sh", "slurm.sbatch"])
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)


def test_cpu_demo_trains_with_torchrun_on_two_processes(tmp_path, corpus_cache):
    sets = real_corpus_overrides(tmp_path, corpus_cache)[1:] + [
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.eval_interval=2",
        "train.save_interval=2",
        "train.eval_steps=1",
        "train.log_interval=2",
        "train.global_batch_tokens=2048",
        "train.micro_batch_size=8",
    ]
    args = [arg for item in sets for arg in ("--set", item)]
    env = dict(os.environ, OUT_DIR=str(tmp_path / "run"), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "cpu_demo.sh"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) on cpu" in proc.stdout and "trained to step 4" in proc.stdout
    final = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == final.name
    assert sorted(p.name for p in final.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    assert json.loads((final / "meta.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid/loss" in r] == [0, 2, 4]
