import json

import pytest

from aoe_ep.cli import main


def _sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny preset trained 4 steps on the built-in corpus (2 MB of it), validated and saved at steps 2 and 4.
    Returns (run directory, {step: logged validation loss})."""
    root = tmp_path_factory.mktemp("tiny_run")
    overrides = [
        f"train.out_dir={root}/run",
        f"data.cache_dir={root}/cache",
        "data.default_corpus_max_bytes=2000000",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.eval_interval=2",
        "train.save_interval=2",
        "train.eval_steps=2",
        "train.global_batch_tokens=2048",
        "train.log_interval=2",
    ]
    assert main(["train", "--config", "tiny"] + _sets(*overrides)) == 0
    run = root / "run"
    logged = {
        r["step"]: r["valid/loss"]
        for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if "valid/loss" in r
    }
    return run, logged


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield
