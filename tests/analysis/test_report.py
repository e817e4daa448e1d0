"""`aoe-ep report`: its summary equals what the log holds (from a real tiny training run), the HTML and figures are
written, a run still writing (partial last line), --compare with the optional keys other parts log, the
communication model against numbers worked out here, the tensorboard layout (histograms and a heatmap image, no
per-expert scalars), older logs, and the errors a user meets."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

from aoe_ep.cli import main
from aoe_ep.moe import LoadStats
from aoe_ep.train.metrics import RunLogger, load_heatmap, moe_scalars
from aoe_ep.train.trainer import train
from tests.train.synthetic import BUILDERS, small_config

FIGURES = (
    "loss.png",
    "load_heatmaps.png",
    "load_over_training.png",
    "idle_time.png",
    "entropy.png",
    "scores.png",
    "wait.png",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real training run: 2 MoE layers, 6 steps, a log every 2, validation every 3."""
    tmp = tmp_path_factory.mktemp("tiny")
    train(small_config(tmp, "model.n_layers=2", "train.log_interval=2", "train.save_interval=100"), data=BUILDERS)
    return tmp / "run"


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _report_json(capsys, *args) -> dict:
    assert main(["report", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_summary_equals_the_log_and_the_report_is_written(tiny_run, tmp_path, capsys):
    summary = _report_json(capsys, tiny_run, "--out", tmp_path / "rep")
    records = _records(tiny_run)
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert summary["final_loss"] == train_records[-1]["train/loss"]
    assert summary["final_valid_loss"] == [r for r in records if "valid/loss" in r][-1]["valid/loss"]
    assert summary["perplexity"] == pytest.approx(np.exp(summary["final_valid_loss"]))
    assert summary["idle_time_expert"] == pytest.approx(np.mean([r["moe/idle_time"] for r in train_records]))
    assert summary["idle_time_device"] == pytest.approx(np.mean([r["moe/idle_time_device"] for r in train_records]))
    spread = [np.mean([r[f"moe/layer{i:02d}/max_minus_min"] for r in train_records]) for i in range(2)]
    assert summary["worst_layer"] == int(np.argmax(spread))
    assert summary["worst_layer_max_minus_min"] == pytest.approx(max(spread))
    assert summary["last_step"] == 6 and summary["logged_steps"] == 3 and summary["scorer"] == "aoe"
    ent = [np.mean([r[f"moe/layer{i:02d}/ent_load"] for r in train_records]) for i in range(2)]
    assert summary["ent_load"] == pytest.approx(np.mean(ent))
    assert summary["experts_per_token"] == 2.0 and summary["erc_eps"] is None and summary["threshold_density"] is None

    out = tmp_path / "rep"
    page = (out / "report.html").read_text()
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"src='{name}'" in page
    assert not (out / "device_load.png").exists()  # EP = 1 logs no device load
    assert f"{summary['final_loss']:.4f}" in page
    assert json.loads((out / "summary.json").read_text())["worst_layer"] == summary["worst_layer"]

    # the default out_dir, and the steps of the heatmaps: the nearest logged ones (a tie takes the earlier)
    from aoe_ep.analysis.report_figures import chosen_steps
    from aoe_ep.train.run_log import read_run

    assert main(["report", str(tiny_run), "--steps", "3", "100"]) == 0
    assert f"{tiny_run}/report/report.html" in capsys.readouterr().out
    assert (tiny_run / "report" / "load_heatmaps.png").is_file()
    assert chosen_steps(read_run(tiny_run), [3, 100]) == [2, 6]
    assert chosen_steps(read_run(tiny_run), None) == [2, 4, 6]


def test_tensorboard_holds_histograms_and_a_heatmap_not_one_scalar_per_expert(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tiny_run / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("moe/layer00/load", "moe/layer01/score_mean", "moe/layer00/tokens_per_expert"):
        assert tag in tags["histograms"], tag
    assert [e.step for e in acc.Histograms("moe/layer00/load")] == [2, 4, 6]
    assert acc.Histograms("moe/layer00/load")[0].histogram_value.num == 4  # one value per expert
    (image,) = tags["images"]
    assert image == "moe/load_heatmap" and len(acc.Images(image)) == 3
    for tag in (
        "moe/idle_time",
        "moe/idle_time_device",
        "moe/layer00/ent_load",
        "moe/layer01/max_minus_min",
        "train/loss",
        "valid/loss",
    ):
        assert tag in tags["scalars"], tag
    assert not [t for t in tags["scalars"] if re.search(r"/(expert|device)\d+$", t)]


def test_heatmap_image_colours_each_layer_and_expert():
    stats = [
        LoadStats.from_counts(torch.tensor(c), torch.tensor(0.0), torch.zeros(4), 10)
        for c in ([5, 5, 5, 5], [20, 0, 0, 0])
    ]
    image_HW3 = load_heatmap(stats)
    assert image_HW3.dtype == np.uint8 and image_HW3.shape[2] == 3
    cell_h, cell_w = image_HW3.shape[0] // 2, image_HW3.shape[1] // 4
    uniform, hot, idle = image_HW3[0, 0], image_HW3[cell_h, 0], image_HW3[cell_h, cell_w]
    assert (image_HW3[:cell_h] == uniform).all()  # a balanced layer is one colour
    assert not np.array_equal(hot, idle) and not np.array_equal(hot, uniform)


def test_a_run_still_writing_and_an_unreadable_line(tiny_run, tmp_path):
    from aoe_ep.analysis.report import summarize
    from aoe_ep.train.run_log import read_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "report"))
    before = summarize(read_run(run))
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 8, "train/loss": 0.1, "moe/lay')  # the trainer is writing this record
    after = summarize(read_run(run))
    assert after["final_loss"] == before["final_loss"] and after["last_step"] == 6
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[:1] + ["{garbled"] + lines[1:-1]) + "\n")
    again = read_run(run)
    assert summarize(again) == before and again.skipped_lines == 1
    assert again.notes == ["1 unreadable line(s) of log.jsonl left out"]


def test_tensorboard_fallback_and_the_earlier_log_format(tiny_run, tmp_path, capsys):
    from aoe_ep.analysis.report import summarize
    from aoe_ep.analysis.report_figures import chosen_steps
    from aoe_ep.train.run_log import read_run

    run = tmp_path / "tb_only"
    shutil.copytree(tiny_run / "tb", run / "tb")
    summary = _report_json(capsys, run, "--out", tmp_path / "r")
    records = [r for r in _records(tiny_run) if "train/loss" in r]
    assert summary["final_loss"] == pytest.approx(records[-1]["train/loss"], rel=1e-6)  # tensorboard keeps fp32
    assert summary["idle_time_expert"] == pytest.approx(np.mean([r["moe/idle_time"] for r in records]), rel=1e-6)
    page = (tmp_path / "r" / "report.html").read_text()
    assert summary["scorer"] is None and "per-expert values are not in them" in page
    assert (tmp_path / "r" / "loss.png").is_file() and not (tmp_path / "r" / "load_heatmaps.png").exists()

    old = tmp_path / "old"
    old.mkdir()
    lines = [
        {
            "step": s,
            "train/loss": 2.0 / s,
            "moe/idle_time": 0.1 * s,
            "moe/idle_time_device": 0.0,
            **{f"moe/layer00/load/expert{e}": [0.1, 0.2, 0.3, 0.4][e] for e in range(4)},
            "moe/layer00/max_minus_min": 0.3,
        }
        for s in (1, 2)
    ]
    (old / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    log = read_run(old)
    assert log.series("moe/layer00/load") == ([1, 2], [[0.1, 0.2, 0.3, 0.4]] * 2)
    assert summarize(log)["worst_layer"] == 0 and chosen_steps(log, None) == [1, 2]


def _synthetic_ep2_run(path, cfg) -> list[dict]:
    """An EP = 2 run's log written by the trainer's logger from made-up statistics, with the optional keys of the
    AoE diagnostics and bias balancing, and counted bytes; its config and layout files as the trainer writes them."""
    gen = torch.Generator().manual_seed(0)
    logger = RunLogger(
        path,
        enabled=True,
        config_yaml=yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False),
        run_info={
            "world_size": 2,
            "expert_parallel_size": 2,
            "micro_batch_size": 2,
            "num_micro_batches": 2,
            "seq_len": 16,
            "precision": "torch.float32",
        },
    )
    records = []
    for step in (5, 10, 15):
        stats = [
            LoadStats.from_counts(
                torch.randint(1, 40, (4,), generator=gen), torch.tensor(50.0), torch.rand(4, generator=gen) * 100, 64
            )
            for _ in range(2)
        ]
        record = {
            "train/loss": 3.0 / step,
            **moe_scalars(stats, torch.rand(2, 2, 2, generator=gen), ep_size=2),
            "moe/bytes_per_step/dispatch/fwd": 1000.0 * step,
            "moe/bytes_per_step/stats/fwd": 400.0,
        }
        for layer in range(2):
            record.update(
                {
                    f"moe/layer{layer:02d}/score_margin": 0.1 * step,
                    f"moe/layer{layer:02d}/churn": 0.5,
                    f"moe/layer{layer:02d}/dead_experts": 0.0,
                    f"moe/layer{layer:02d}/bias": [0.01 * step, -0.01 * step, 0.0, 0.002],
                }
            )
        logger.log(step, record, images={"moe/load_heatmap": load_heatmap(stats)})
        records.append(record)
    logger.close()
    return records


def test_compare_optional_keys_and_the_communication_model(tiny_run, tmp_path, capsys):
    cfg = small_config(tmp_path, "model.n_layers=2", "parallel.expert_parallel_size=2", "moe.dispatcher=alltoall")
    ep2 = tmp_path / "ep2"
    records = _synthetic_ep2_run(ep2, cfg)
    summary = _report_json(capsys, ep2, "--compare", tiny_run, "--out", tmp_path / "cmp")
    assert summary["expert_parallel_size"] == 2 and summary["final_loss"] == pytest.approx(3.0 / 15)
    assert summary["idle_time_device"] == pytest.approx(np.mean([r["moe/idle_time_device"] for r in records]))
    assert summary["idle_time_device"] > 0
    (other,) = summary["compare"]
    assert other["run"] == str(tiny_run)
    assert other["final_loss"] == [r for r in _records(tiny_run) if "train/loss" in r][-1]["train/loss"]
    out = tmp_path / "cmp"
    for name in FIGURES + ("device_load.png", "comm.png", "diagnostics.png", "bias.png"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert page.count("<th>") >= 3  # the summary table has a column per run

    # the model, by hand: T = 2 x 16 tokens per micro-batch, 2 micro-batches, 2 layers, d = 32, d_low = 8, n = 4
    from aoe_ep.analysis.comm_expected import expected_bytes_per_step
    from aoe_ep.train.run_log import read_run

    models = expected_bytes_per_step(read_run(ep2))
    uniform, logged = models["model, uniform routing"], models["model, logged device load"]
    assert uniform["stats/fwd"] == (2 - 1) * (3 * 4 + 3) * 8 * 2 * 2  # counts, Σp, Σs, Σ entropy, Σ margin, its tokens
    # a token row (d + one column of expert flags) leaves unless both its experts are local: 1 − C(2, 2)/C(4, 2)
    assert uniform["dispatch/fwd"] == pytest.approx(32 * (1 - 1 / 6) * (32 + 1) * 4 * 2 * 2)
    assert uniform["cache/fwd"] == pytest.approx(32 * 2 * 0.5 * 8 * 4 * 2 * 2)  # half of the K pairs leave
    device1 = [np.mean([r[f"moe/layer{i:02d}/device_load"][1] for r in records]) for i in range(2)]
    assert logged["cache/fwd"] == pytest.approx(sum(32 * 2 * d * 8 * 4 * 2 for d in device1))
    assert logged["gates/fwd"] == pytest.approx(sum(32 * 2 * d * 4 * 2 for d in device1))


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("aoe-ep: report error: ")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "neither log.jsonl nor tb/" in capsys.readouterr().err
    (tmp_path / "empty" / "log.jsonl").write_text("")
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aoe-ep: report error: ") and "no records" in err and err.count("\n") == 1
