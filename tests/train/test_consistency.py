"""Ranks started with different configs, `--resume` or package versions stop at start-up, every one with the same
error naming
what differs and where, before any data or model is built (nothing is written to train.out_dir)."""

from __future__ import annotations

import pytest

from aoe_ep.config import ConfigError
from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train import consistency
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config


def _start(cfg, resume=None) -> str:
    with pytest.raises(ConfigError) as err:
        Trainer(cfg, resume=resume, data=BUILDERS)
    return str(err.value)


def _worker(rank: int, world: int, tmp_path) -> dict:
    lr = "train.lr=0.02" if rank == 1 else "train.lr=0.01"
    config = _start(small_config(tmp_path / "config", lr))
    versions = consistency.package_versions
    if rank == 1:
        consistency.package_versions = lambda: dict(versions(), torch="2.12.0")
    try:
        packages = _start(small_config(tmp_path / "packages"))
    finally:
        consistency.package_versions = versions
    resume = _start(small_config(tmp_path / "resume"), resume="latest" if rank == 1 else None)
    with Trainer(small_config(tmp_path / "same"), data=BUILDERS) as trainer:  # the same everywhere: no error
        same = trainer.step
    return {"config": config, "packages": packages, "resume": resume, "same": same}


def test_ranks_with_different_configs_or_versions_stop_together(tmp_path):
    results = run_distributed(2, _worker, tmp_path)
    assert results[0] == results[1]
    config, packages = results[0]["config"], results[0]["packages"]
    assert config.startswith(
        "train.lr: 0.01 on rank 0; 0.02 on rank 1 -- the ranks were started with different "
        "configurations or package versions"
    )
    torch_version = consistency.package_versions()["torch"]
    assert packages.startswith(f"torch: '{torch_version}' on rank 0; '2.12.0' on rank 1 -- ")
    assert results[0]["resume"].startswith("--resume: None on rank 0; 'latest' on rank 1 -- ")
    assert not (tmp_path / "config" / "run").exists() and not (tmp_path / "packages" / "run").exists()
    assert results[0]["same"] == 0
