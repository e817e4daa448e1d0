"""Importing the package leaves the process's warning filters as they were; megatron-core's start-up warnings about
Transformer Engine and apex are silenced at that import only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import warnings
import megatron.core  # megatron-core (and torch) may set filters of their own when imported
before = list(warnings.filters)
import aoe_ep, aoe_ep.moe, aoe_ep.train.optim, aoe_ep.data.preprocessing
assert warnings.filters == before, [f for f in warnings.filters if f not in before]
"""


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_importing_the_package_sets_no_warning_filter():
    result = _python(PROBE)
    assert result.returncode == 0, result.stderr


def test_megatron_core_comes_without_its_start_up_warnings():
    quiet = _python("import aoe_ep.moe", "-W", "always::UserWarning")
    assert quiet.returncode == 0, quiet.stderr
    assert "Transformer Engine and Apex are not installed" not in quiet.stderr
    loud = _python("import megatron.core", "-W", "always::UserWarning")  # the warning this silences
    assert "Transformer Engine and Apex are not installed" in loud.stderr
