"""The levers part of `launch/gpu_check.sh` (`aoe_ep.bench.gpu_check`), run on the CPU in fp32 with the tiny model
and one round: what the CUDA run computes in bf16 on the tiny model and the 732M slices, with the same code."""

from __future__ import annotations

import json

import pytest

from aoe_ep.bench import gpu_check
from aoe_ep.config import ConfigError


def test_the_levers_part_runs_alone_and_writes_its_json_and_table(tmp_path):
    """As the whole check runs it: `--only levers` in its own process, read back from levers.json."""
    result = gpu_check._levers(tmp_path, "cpu", 300)
    assert result["rc"] == 0, (tmp_path / "levers.log").read_text()[-2000:]
    assert result == {"rc": 0, "seconds": result["seconds"], **json.loads((tmp_path / "levers.json").read_text())}
    assert result["dtype"] == "float32" and result["rounds"] == 1
    assert result["shapes"] == {"tiny (AoE)": [2, 32]} and result["contenders"] == ["none", "selective", "full"]
    rows = {r["contender"]: r for r in result["rows"]}
    assert set(rows) == {"none", "selective", "full"}
    assert rows["full"]["kept_bytes"] < rows["selective"]["kept_bytes"] < rows["none"]["kept_bytes"]
    assert rows["none"]["memory_vs_none"] == 1.0 and rows["none"]["speed_vs_none"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] is None and r["model"] == "tiny (AoE)" for r in rows.values())
    table = (tmp_path / "levers.log").read_text().split("== aoe-ep GPU check (cpu")[1].splitlines()
    assert [line.split("  ")[0] for line in table[1:]] == [f"tiny (AoE): {c}" for c in ("none", "selective", "full")]
    assert "kept" in table[3] and "of none" in table[3]


def test_a_machine_that_cannot_compile_leaves_the_compiled_contender_out(monkeypatch):
    def cannot(device):
        raise ConfigError("train.compile: this machine cannot compile for cpu (no compiler); set train.compile=false")

    monkeypatch.setattr("aoe_ep.train.compile.check_compile", cannot)
    result = gpu_check.levers("cpu", "float32", 1, {"tiny (AoE)": (1, 16)}, ("none", "full", "compiled"))
    assert result["contenders"] == ["none", "full"] and "cannot compile" in result["compile_error"]
    assert [r["contender"] for r in result["rows"]] == ["none", "full"]
    rows = gpu_check._lever_rows(result)
    assert rows[-1][0] == "levers: compiled" and "cannot compile" in rows[-1][1]


def test_a_failed_levers_part_is_one_row_and_bad_dtypes_are_refused():
    assert gpu_check._lever_rows({"rc": 124, "seconds": 120.0}) == [("levers", "rc 124 (see levers.log)")]
    assert gpu_check._lever_rows({}) == []
    with pytest.raises(ValueError, match="^dtype: must be 'bfloat16' or 'float32', got 'float16'"):
        gpu_check.levers("cpu", "float16", 1, {"tiny (AoE)": (1, 16)})
