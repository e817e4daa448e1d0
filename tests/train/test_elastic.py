"""Two torchrun agents on one machine through `launch/train_multinode.sh` (c10d rendezvous on 127.0.0.1, two
processes each, EP = 2 x DP = 2) on the tiny config: the losses equal those of one process whose micro-batch holds an
EP group's tokens; and with restarts allowed, a worker SIGKILLed mid-run makes both agents restart their workers,
which resume from the newest complete checkpoint and end bit for bit where the uninterrupted run ends.

Slow (four fresh processes per attempt on a 2-core box), so both runs are few steps of a small model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from aoe_ep.config import load_config
from aoe_ep.train.trainer import train
from tests.train.conftest import real_corpus_overrides

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
# 8 sequences of 32 per step: one micro-batch of 2 per rank on 4 ranks; an EP group's 4 sequences in one process.
SETS = [
    "model.max_seq_len=32",
    "data.seq_len=32",
    "train.global_batch_tokens=256",
    "train.micro_batch_size=2",
    f"train.max_steps={STEPS}",
    "train.warmup_steps=1",
    "train.eval_interval=4",
    "train.eval_steps=1",
    "train.save_interval=2",
    "train.log_interval=1",
    "parallel.expert_parallel_size=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_agents(out_dir: Path, sets: list[str], max_restarts: int) -> list[subprocess.Popen]:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        NNODES="2",
        NPROC="2",
        RDZV_ID=f"test-{out_dir.name}",
        MAX_RESTARTS=str(max_restarts),
    )
    args = [arg for item in sets + [f"train.out_dir={out_dir}"] for arg in ("--set", item)]
    return [
        subprocess.Popen(
            ["bash", str(REPO / "launch" / "train_multinode.sh"), "--config", "tiny", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]


def _finish(agents: list[subprocess.Popen], timeout: float = 420) -> list[str]:
    outputs = []
    for agent in agents:
        try:
            outputs.append(agent.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for a in agents:
                os.killpg(a.pid, signal.SIGKILL)
            raise
    failed = [
        f"agent {i} exited with {a.returncode}:\n{out[-3000:]}"
        for i, (a, out) in enumerate(zip(agents, outputs))
        if a.returncode != 0
    ]
    assert not failed, "\n".join(failed)
    return outputs


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _losses(out_dir: Path) -> dict[int, float]:
    """Step -> logged training loss; a resumed run logs its steps again after the checkpoint, the last one counts."""
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _final_valid(out_dir: Path) -> float:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r["valid/loss"] for r in records if "valid/loss" in r and r["step"] == STEPS][-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_cache):
    tmp = tmp_path_factory.mktemp("two_agents")
    sets = real_corpus_overrides(tmp, corpus_cache)[1:] + SETS
    started = time.perf_counter()
    outputs = _finish(_start_agents(tmp / "run", sets, max_restarts=0))
    print(f"two agents, {STEPS} steps: {time.perf_counter() - started:.1f}s")
    return tmp, sets, outputs


def test_two_agents_match_one_process(uninterrupted, tmp_path):
    tmp, sets, outputs = uninterrupted
    assert sum("4 rank(s) on cpu (EP 2" in out for out in outputs) == 1  # rank 0 announces, on one agent
    got = _losses(tmp / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    cfg = load_config(
        "tiny", sets + ["parallel.expert_parallel_size=1", "train.micro_batch_size=4", f"train.out_dir={tmp_path}/one"]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only contend with the other processes on the box
    try:
        want = {r.step: r.loss for r in train(cfg).history}
    finally:
        torch.set_num_threads(threads)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=2e-5), step
    assert want[STEPS] < want[1]


def test_killed_worker_restarts_and_resumes_bit_for_bit(uninterrupted, tmp_path):
    tmp, sets, _ = uninterrupted
    out_dir = tmp_path / "run"
    started = time.perf_counter()
    agents = _start_agents(out_dir, sets, max_restarts=1)
    latest = out_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() == "step_00000002"):
        assert all(a.poll() is None for a in agents), "a run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    victims = _children(agents[1].pid)
    assert victims, "the second agent has no workers"
    os.kill(victims[-1], signal.SIGKILL)
    outputs = _finish(agents)
    print(f"two agents with a restart: {time.perf_counter() - started:.1f}s")

    text = "\n".join(outputs)
    assert "resumed from" in text, text[-4000:]
    resumed_at = int(text.split("resumed from")[1].split("(step ")[1].split(",")[0])
    assert 2 <= resumed_at < STEPS  # restarted mid-run, from a checkpoint, not from scratch
    assert _losses(out_dir) == _losses(tmp / "run")  # bit for bit (JSON floats round-trip exactly)
    assert _final_valid(out_dir) == _final_valid(tmp / "run")
