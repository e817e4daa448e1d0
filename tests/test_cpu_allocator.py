"""The allocator re-execution is for CPU runs only: which heavy commands count as CPU runs, and the line they print."""

from __future__ import annotations

import pytest

from aoe_ep import cpu_allocator
from aoe_ep.cli import _runs_on_cpu, build_parser


@pytest.mark.parametrize(
    "argv, cpu",
    [
        (["train", "--config", "tiny", "--set", "train.device=cpu"], True),
        (["train", "--config", "tiny", "--set", "train.device=cuda"], False),
        (["bench", "layer", "--device", "cpu"], True),
        (["bench", "layer", "--device", "cuda"], False),
        (["bench", "dispatch"], True),
    ],
)
def test_only_cpu_runs_take_the_allocator(argv, cpu):
    assert _runs_on_cpu(build_parser().parse_args(argv)) is cpu


def test_a_config_that_does_not_load_is_left_to_the_command():
    args = build_parser().parse_args(["train", "--config", "tiny", "--set", "train.no_such_field=1"])
    assert _runs_on_cpu(args) is False


def test_the_announcement_says_it_is_a_cpu_run(monkeypatch):
    monkeypatch.delenv("AOE_EP_ALLOCATOR_APPLIED", raising=False)
    assert cpu_allocator.announce().startswith("aoe-ep: CPU run, memory allocator ")
    assert "as the process started" in cpu_allocator.announce()
    monkeypatch.setenv("AOE_EP_ALLOCATOR_APPLIED", "1")
    assert "re-executed itself" in cpu_allocator.announce()
