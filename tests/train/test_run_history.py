"""Nothing lost, nothing silently wrong: resuming from an older checkpoint starts a new history (the later
checkpoints move aside, what the run reports as saved is on disk, `latest` names it), one run per out_dir (a lock
that the OS releases even after SIGKILL), each start's config recorded, non-finite weights never saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from aoe_ep.cli import main
from aoe_ep.config import ConfigError
from aoe_ep.train.guards import TrainingError
from aoe_ep.train.run_lock import PID_NAME, RunLock
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config


def _sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> str:
    """A small byte-tokenized dataset (400 short documents): a real data path that needs no corpus."""
    from aoe_ep.data import preprocess

    d = tmp_path_factory.mktemp("documents")
    text = d / "docs.txt"
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}\n" * 8 for i in range(400)))
    preprocess([str(text)], str(d / "docs"), "byte", txt_mode="paragraph")
    return str(d / "docs")


def test_resuming_from_an_older_checkpoint_saves_the_new_history(tmp_path, documents, capsys):
    """The diverged-run workflow: train to 10, go back to 5 with another lr. The step-10 checkpoint the second run
    reports is its own (eval gives its logged validation loss) and the first run's is kept aside."""
    base = [
        f"train.out_dir={tmp_path}/run",
        f"data.paths=[{documents}]",
        f"data.cache_dir={tmp_path}/cache",
        "train.eval_interval=1000",
        "train.eval_at_start=false",
        "train.warmup_steps=1",
        "train.max_steps=10",
        "train.save_interval=5",
        "train.eval_steps=1",
        "train.global_batch_tokens=512",
        "train.micro_batch_size=4",
        "train.device=cpu",
    ]
    root = tmp_path / "run" / "checkpoints"
    assert main(["train", "--config", "tiny"] + _sets(*base)) == 0
    first_out = capsys.readouterr().out
    assert (
        main(["train", "--config", "tiny", "--resume", str(root / "step_00000005")] + _sets(*base, "train.lr=0.02"))
        == 0
    )
    out = capsys.readouterr().out
    assert "changed since that checkpoint: train.lr 0.003 -> 0.02" in out
    assert "moved to" in out and "step_00000010" in out
    reported = out.strip().splitlines()[-1]
    assert f"checkpoint {root / 'step_00000010'}" in reported
    logged = float(reported.split("validation loss ")[1].split(";")[0])
    assert logged != float(first_out.strip().splitlines()[-1].split("validation loss ")[1].split(";")[0])

    assert (root / "latest").read_text().strip() == "step_00000010"
    assert main(["eval", "--checkpoint", str(root / "step_00000010"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["loss"]
    assert round(evaluated, 4) == logged
    (aside,) = root.glob("superseded_after_step_00000005_*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000010"]  # the first run's, kept
    starts = sorted(p.name for p in (tmp_path / "run" / "starts").iterdir())
    assert starts == ["start_001_step_00000000.yaml", "start_002_step_00000005.yaml"]
    assert "lr: 0.003" in (tmp_path / "run" / "config.yaml").read_text()  # the first start's record is kept


def test_resume_past_max_steps_is_refused(tmp_path):
    cfg = small_config(tmp_path, "train.max_steps=3", "train.eval_at_start=false")
    with Trainer(cfg, data=BUILDERS) as trainer:
        trainer.fit()
    with pytest.raises(ConfigError, match="train.max_steps: the checkpoint .* is at step 3, past max_steps=2"):
        Trainer(small_config(tmp_path, "train.max_steps=2", "train.warmup_steps=0"), resume="latest", data=BUILDERS)


def test_nonfinite_parameters_are_never_saved(tmp_path):
    cfg = small_config(tmp_path, "train.max_steps=6", "train.exit_at_step=3", "train.eval_at_start=false")
    with Trainer(cfg, data=BUILDERS) as trainer:
        trainer.fit()
        with torch.no_grad():
            next(trainer.dp.model.parameters()).fill_(float("nan"))
        with pytest.raises(TrainingError, match="step 3: the parameters are not finite.*still names .*step_00000003"):
            trainer.save()
        trainer.step = 4
        with pytest.raises(TrainingError, match="parameters are not finite"):
            trainer.save()
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000003" and not (root / "step_00000004").exists()


def _hold_lock(out_dir) -> subprocess.Popen:
    code = (
        "import sys, time; from pathlib import Path; from aoe_ep.train.run_lock import RunLock; "
        "RunLock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_out_dir_is_refused_and_a_killed_holder_leaves_a_stale_lock(tmp_path, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    holder = _hold_lock(out_dir)
    try:
        assert main(["train", "--config", "tiny"] + _sets(f"train.out_dir={out_dir}", "train.device=cpu")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("aoe-ep: config error: train.out_dir: ") and "in use by another run" in err
        assert f"pid {holder.pid} on" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out_dir / PID_NAME).exists()  # SIGKILL ran no clean-up: the pid file stays, the OS freed the lock
    lock = RunLock.acquire(out_dir)
    assert lock.stale is not None and f"pid {holder.pid} on" in lock.stale
    lock.release()
    assert not (out_dir / PID_NAME).exists()
    lock = RunLock.acquire(out_dir)
    assert lock.stale is None
    lock.release()


# A training command that imports everything first, says so, and starts once the go file exists: two of them start
# their runs within the same few milliseconds, however long each took to import on a loaded machine.
STARTS_ON_GO = (
    "import sys, time; from pathlib import Path; from aoe_ep import cli; import aoe_ep.train.trainer; "
    "print('ready', flush=True); go = Path(sys.argv[1]); "
    "[time.sleep(0.005) for _ in iter(lambda: go.exists(), True)]; sys.exit(cli.main(sys.argv[2:]))"
)


def test_two_runs_started_together_in_one_out_dir(tmp_path, documents):
    """Both start at the same moment: one trains, the other stops at once with one line naming the holder; the
    log has one record per step and config.yaml is the winner's."""
    out_dir, go = tmp_path / "run", tmp_path / "go"

    def start(seed: int) -> subprocess.Popen:
        args = [
            "train",
            "--config",
            "tiny",
            *_sets(
                f"train.out_dir={out_dir}",
                f"data.paths=[{documents}]",
                f"data.cache_dir={tmp_path}/cache{seed}",
                f"train.seed={seed}",
                "train.max_steps=4",
                "train.warmup_steps=1",
                "train.eval_interval=2",
                "train.eval_steps=1",
                "train.save_interval=2",
                "train.log_interval=1",
                "train.global_batch_tokens=512",
                "train.micro_batch_size=4",
                "train.device=cpu",
            ),
        ]
        env = dict(os.environ, AOE_EP_ALLOCATOR="system")
        return subprocess.Popen(
            [sys.executable, "-c", STARTS_ON_GO, str(go), *args],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    runs = [start(1), start(2)]
    assert [p.stdout.readline().strip() for p in runs] == ["ready", "ready"]
    go.touch()
    results = [(p.returncode, *p.communicate(timeout=300)) for p in runs]
    results = [(p.returncode, out, err) for p, (_, out, err) in zip(runs, results)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    _, _, loser_err = results[1 - winner]
    lines = [line for line in loser_err.splitlines() if line.startswith("aoe-ep:") and "allocator" not in line]
    assert len(lines) == 1 and "in use by another run" in lines[0] and "Traceback" not in loser_err, loser_err
    assert f"pid {runs[winner].pid} on" in lines[0]
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert f"seed: {winner + 1}" in (out_dir / "config.yaml").read_text()
    assert not (out_dir / PID_NAME).exists()  # released by the winner's clean exit
    RunLock.acquire(out_dir).release()


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, documents):
    """SIGINT to a training process once it has a checkpoint: one line naming the step, the last checkpoint and
    how to resume; exit status 130; the lock is released."""
    out_dir = tmp_path / "run"
    args = _sets(
        f"train.out_dir={out_dir}",
        f"data.paths=[{documents}]",
        f"data.cache_dir={tmp_path}/cache",
        "train.max_steps=500",
        "train.warmup_steps=1",
        "train.eval_interval=1000",
        "train.eval_steps=1",
        "train.eval_at_start=false",
        "train.save_interval=1",
        "train.global_batch_tokens=512",
        "train.micro_batch_size=4",
        "train.device=cpu",
    )
    env = dict(os.environ, AOE_EP_ALLOCATOR="system")
    run = subprocess.Popen(
        [sys.executable, "-m", "aoe_ep.cli", "train", "--config", "tiny", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # as from a terminal, whatever this process inherited: a shell's background job ignores SIGINT, and so would
        # the child
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    latest = out_dir / "checkpoints" / "latest"
    while not latest.exists() and run.poll() is None:
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("aoe-ep train:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("aoe-ep train: interrupted at step ")
    assert f"the last checkpoint is {out_dir}/checkpoints/step_" in lines[0] and "--resume" in lines[0]
    assert not (out_dir / PID_NAME).exists()
