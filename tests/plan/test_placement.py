"""`aoe-ep plan --placement RUN_DIR`: the per-device spread of a run's measured load under the contiguous and the
balanced placement, from a checkpoint's recorded load or from either log.jsonl format, against hand-computed
figures."""

from __future__ import annotations

import json

import pytest

from aoe_ep.cli import main

# 4 experts over 2 ranks; contiguous [0, 1] | [2, 3]. Layer 0: 0.4 + 0.3 vs 0.2 + 0.1 -> 0.4; balanced [0, 3] | [1, 2]
# -> 0.0. Layer 1 even: 0 under both.
LOAD = [[40, 30, 20, 10], [25, 25, 25, 25]]


def _checkpoint(run, step=4, load=LOAD, placement=None):
    path = run / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    meta = {
        "step": step,
        "consumed_samples": 8,
        "expert_parallel_size": 2,
        "expert_load": {"since_step": 0, "steps": step, "tokens_per_expert": load},
    }
    if placement is not None:
        meta["expert_placement"] = {"mode": "balanced", "layers": placement}
    (path / "meta.json").write_text(json.dumps(meta))
    (run / "checkpoints" / "latest").write_text(path.name + "\n")


def _plan(capsys, *args) -> dict:
    assert main(["plan", "--placement", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_gain_from_the_checkpoint_record(tmp_path, capsys):
    _checkpoint(tmp_path, placement=[[[0, 3], [1, 2]], [[0, 1], [2, 3]]])
    gain = _plan(capsys, tmp_path)
    assert gain["ep"] == 2 and gain["num_experts"] == 4
    assert [layer["contiguous"] for layer in gain["layers"]] == pytest.approx([0.4, 0.0])
    assert [layer["balanced"] for layer in gain["layers"]] == pytest.approx([0.0, 0.0])
    assert gain["layers"][0]["placement"] == [[0, 3], [1, 2]]
    assert gain["layers"][1]["placement"] == [[0, 1], [2, 3]]  # nothing to gain: stays contiguous
    assert gain["idle_time_device_contiguous"] == pytest.approx(0.4)
    assert gain["predicted_gain"] == pytest.approx(0.4) and gain["predicted_gain_relative"] == pytest.approx(1.0)
    assert gain["idle_time_device_current"] == pytest.approx(0.0)
    assert main(["plan", "--placement", str(tmp_path)]) == 0  # the table
    text = capsys.readouterr().out
    assert "predicted idle-time gain" in text and "0.4000" in text


@pytest.mark.parametrize("as_lists", [True, False])
def test_gain_from_either_log_format(tmp_path, capsys, as_lists):
    with open(tmp_path / "log.jsonl", "w") as f:
        for step, rows in ((10, [[0.5, 0.3, 0.1, 0.1], [0.25] * 4]), (20, [[0.3, 0.3, 0.3, 0.1], [0.25] * 4])):
            record = {"step": step, "train/loss": 3.0}
            for i, row in enumerate(rows):
                if as_lists:
                    record[f"moe/layer{i:02d}/load"] = row
                else:
                    record.update({f"moe/layer{i:02d}/load/expert{e}": v for e, v in enumerate(row)})
                record.update({f"moe/layer{i:02d}/device_load/device{k}": 0.5 for k in range(2)})
            f.write(json.dumps(record) + "\n")
        f.write('{"step": 30, "moe/lay')  # a line still being written
    gain = _plan(capsys, tmp_path)
    # summed load: [0.8, 0.6, 0.4, 0.2] / 2 -> contiguous 0.7 vs 0.3 = 0.4; balanced [0, 3] | [1, 2] = 0
    assert gain["ep"] == 2
    assert gain["layers"][0]["contiguous"] == pytest.approx(0.4)
    assert gain["layers"][0]["balanced"] == pytest.approx(0.0)
    assert "2 logged windows" in gain["source"]


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["plan", "--placement", str(tmp_path / "missing")]) == 2
    assert "aoe-ep plan: error: --placement" in capsys.readouterr().err
    assert main(["plan", "--placement", str(tmp_path)]) == 2  # an empty run
    assert "no measured load" in capsys.readouterr().err
    _checkpoint(tmp_path)
    assert main(["plan", "--placement", str(tmp_path), "--ep", "3"]) == 2
    assert "cannot be split over 3" in capsys.readouterr().err
    assert main(["plan"]) == 2
    assert "name a CONFIG" in capsys.readouterr().err
