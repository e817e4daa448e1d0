"""Every bad input a user can give a subcommand ends in exit status 2 and one line on stderr that names the cause,
never a traceback: one parametrised test per subcommand, called in-process (the same `main` the console script
runs)."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch

from aoe_ep.cli import main


def assert_one_line(capsys, argv: list[str], cause: str, prefix: str = "aoe-ep") -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(prefix) and cause in lines[0], lines[0]
    return lines[0]


def _sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    (d / "list.yaml").write_text("- model\n- moe\n")
    (d / "empty.yaml").write_text("")
    (d / "twice.yaml").write_text("model:\n  d_model: 64\n  d_model: 32\n")
    (d / "folder.yaml").mkdir()
    return d


PARAMS_CASES = {
    "top_level_list": (["{d}/list.yaml"], "must hold a mapping of sections"),
    "empty_yaml": (["{d}/empty.yaml"], "is empty"),
    "duplicate_key": (["{d}/twice.yaml"], "the key 'd_model' is given twice"),
    "directory": (["{d}/folder.yaml"], "is a directory"),
    "no_such_preset": (["nowhere/nothing"], "no file or preset named 'nowhere/nothing'"),
    "empty_lr": (["tiny", *_sets("train.lr=")], "train.lr: needs a value"),
    "empty_out_dir": (["tiny", *_sets("train.out_dir=")], "train.out_dir: needs a value"),
    "empty_rope_theta": (["tiny", *_sets("model.rope_theta=")], "model.rope_theta: needs a value"),
    "empty_seed": (["tiny", *_sets("train.seed=")], "train.seed: needs a value"),
    "lr_inf": (["tiny", *_sets("train.lr=inf")], "train.lr: must be a positive finite number, got inf"),
    "lr_nan": (["tiny", *_sets("train.lr=nan")], "train.lr: must be a positive finite number, got nan"),
    "weight_decay_nan": (["tiny", *_sets("train.weight_decay=nan")], "train.weight_decay: must be a finite"),
    "grad_clip_inf": (["tiny", *_sets("train.grad_clip=inf")], "train.grad_clip: must be a positive finite"),
    "aux_loss_coeff_inf": (["tiny", *_sets("moe.aux_loss_coeff=inf")], "moe.aux_loss_coeff: must be a finite"),
    "rope_theta_nan": (["tiny", *_sets("model.rope_theta=nan")], "model.rope_theta: must be a positive finite"),
    "rope_theta_zero": (["tiny", *_sets("model.rope_theta=0")], "model.rope_theta: must be a positive finite"),
    "norm_eps_zero": (["tiny", *_sets("model.norm_eps=0")], "model.norm_eps: must be a positive finite"),
    "norm_eps_nan": (["tiny", *_sets("model.norm_eps=nan")], "model.norm_eps: must be a positive finite"),
    "peak_tflops_inf": (["tiny", *_sets("train.peak_tflops=inf")], "train.peak_tflops: must be a finite"),
    "beta2_nan": (["tiny", *_sets("train.beta2=nan")], "train.beta2: must lie in [0, 1)"),
    "capacity_factor_inf": (["tiny", *_sets("moe.capacity_factor=inf")], "moe.capacity_factor"),
    "d_model_66_is_model_field": (["tiny", *_sets("model.d_model=66")], "model.n_heads: d_model=66"),
    "d_model_zero_is_model_field": (["tiny", *_sets("model.d_model=0")], "model.d_model: must be a positive"),
    "bad_yaml_value": (["tiny", *_sets("train.lr=[1")], "train.lr: the value '[1' is not valid YAML"),
    "not_an_override": (["tiny", *_sets("lr")], "an override must read section.field=value"),
}


@pytest.mark.parametrize("case", sorted(PARAMS_CASES))
def test_params(case, configs, capsys):
    argv, cause = PARAMS_CASES[case]
    assert_one_line(capsys, ["params", *(a.format(d=configs) for a in argv)], cause, "aoe-ep: config error: ")


TRAIN_CASES = {
    "out_dir_unwritable": (["train.out_dir=/proc/foo"], "train.out_dir: cannot create /proc/foo"),
    "out_dir_is_a_file": (["train.out_dir={d}/file"], "exists and is not a directory"),
    "model_larger_than_memory": (["model.d_model=1000000000", "model.n_heads=1"], "GiB of cpu memory here"),
    "lr_inf": (["train.lr=inf"], "train.lr: must be a positive finite number"),
    "empty_out_dir": (["train.out_dir="], "train.out_dir: needs a value"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train(case, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory\n")
    overrides, cause = TRAIN_CASES[case]
    argv = [
        "train",
        "--config",
        "tiny",
        *_sets("train.device=cpu", f"train.out_dir={tmp_path}/run", *(o.format(d=tmp_path) for o in overrides)),
    ]
    assert_one_line(capsys, argv, cause, "aoe-ep: config error: ")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_interrupted_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of a step: the step, the last checkpoint and how to resume, exit status 130."""
    from aoe_ep.train import trainer as trainer_module
    from tests.train.synthetic import BUILDERS

    monkeypatch.setattr(trainer_module, "default_data_builders", lambda: BUILDERS)
    real_step = trainer_module.Trainer._train_step

    def step_then_interrupt(self, timed):
        if self.step == 1:
            raise KeyboardInterrupt
        return real_step(self, timed)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", step_then_interrupt)
    from tests.train.synthetic import small_config

    cfg = small_config(tmp_path, "train.save_interval=1", "train.eval_at_start=false")
    monkeypatch.setattr("aoe_ep.config.load_config", lambda name, overrides=None: cfg)
    assert main(["train", "--config", "tiny"]) == 130
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("aoe-ep train:")]
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err
    assert lines[0] == (
        f"aoe-ep train: interrupted at step 1; the last checkpoint is {tmp_path}/run/checkpoints/"
        f"step_00000001 (step 1); continue from it with the same command and --resume"
    )
    assert not (tmp_path / "run" / ".lock.pid").exists()  # the lock went with the run


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A finite checkpoint and one whose weights hold NaN (written around the trainer's refusal)."""
    from aoe_ep.train.trainer import Trainer
    from tests.train.synthetic import BUILDERS, small_config

    d = tmp_path_factory.mktemp("checkpoints")
    with Trainer(
        small_config(
            d / "good",
            "train.max_steps=2",
            "train.save_interval=2",
            "train.eval_at_start=false",
            "train.warmup_steps=0",
        ),
        data=BUILDERS,
    ) as trainer:
        trainer.fit()
    with Trainer(
        small_config(
            d / "nan", "train.max_steps=2", "train.save_interval=2", "train.eval_at_start=false", "train.warmup_steps=0"
        ),
        data=BUILDERS,
    ) as trainer:
        with torch.no_grad():
            next(trainer.dp.model.parameters()).fill_(float("nan"))
        trainer._refuse_nonfinite_parameters = lambda: None
        trainer.save()
    return d


def _copy_run(checkpoints, tmp_path) -> str:
    run = tmp_path / "run"
    shutil.copytree(checkpoints / "good" / "run" / "checkpoints", run / "checkpoints")
    return str(run)


EVAL_CASES = {
    "nonfinite_weights": (lambda ck, tmp: f"{ck}/nan/run/checkpoints/step_00000000", "the weights hold NaN or inf"),
    "missing": (lambda ck, tmp: f"{tmp}/nowhere", "neither a complete checkpoint directory"),
    "empty_latest": ("", "latest is empty"),
    "latest_outside": ("../../elsewhere", "not the name of a step directory beside it"),
    "latest_missing_step": ("step_00000099", "names step_00000099, which does not exist"),
    "invalid_meta": ("meta", "meta.json: cannot be read"),
    "device_as_data": ("device", "/dev/zero: not a regular file"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval(case, checkpoints, tmp_path, capsys):
    spec, cause = EVAL_CASES[case]
    if callable(spec):
        target = spec(checkpoints, tmp_path)
    else:
        target = _copy_run(checkpoints, tmp_path)
        root = tmp_path / "run" / "checkpoints"
        if spec == "meta":
            (root / "step_00000002" / "meta.json").write_text("{not json")
        elif spec == "device":
            assert_one_line(
                capsys,
                ["eval", "--checkpoint", target, "--device", "cpu", "--data", "/dev/zero"],
                cause,
                "aoe-ep: data error: ",
            )
            return
        else:
            (root / "latest").write_text(spec + "\n")
    assert_one_line(capsys, ["eval", "--checkpoint", target, "--device", "cpu"], cause, "aoe-ep: checkpoint error: ")


def test_eval_nonfinite_checkpoint_named(checkpoints, capsys):
    """The non-finite checkpoint above really was written at step 0, and the finite one loads."""
    assert (checkpoints / "nan" / "run" / "checkpoints" / "step_00000000").is_dir()
    from aoe_ep.eval.loading import open_checkpoint

    with open_checkpoint(checkpoints / "good" / "run", device="cpu") as loaded:
        assert loaded.step == 2


GENERATE_CASES = {
    "greedy_with_top_p": (["--greedy", "--top-p", "0.5"], "--greedy takes the most likely token, --top-p samples"),
    "temperature_nan": (["--top-p", "0.9", "--temperature", "nan"], "--temperature: must be a positive finite"),
    "temperature_inf": (["--top-p", "0.9", "--temperature", "inf"], "--temperature: must be a positive finite"),
    "temperature_zero": (["--temperature", "0"], "--temperature: must be a positive finite"),
    "top_p_above_one": (["--top-p", "1.5"], "--top-p: must lie in (0, 1]"),
    "prompt_not_utf8": (["--prompt", b"\xff\xfe".decode("utf-8", "surrogateescape")], "--prompt: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate(case, checkpoints, capsys):
    extra, cause = GENERATE_CASES[case]
    argv = ["generate", "--checkpoint", str(checkpoints / "good" / "run"), "--device", "cpu"]
    argv += extra if "--prompt" in extra else ["--prompt", "def ", *extra]
    assert_one_line(capsys, argv, cause, "aoe-ep generate: error: ")


@pytest.fixture()
def malformed_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 10, "train/loss": 2.0, "moe/layer00/load": [1.0, 1.0, 1.0, 1.0], "moe/idle_time": 0.5},
        {"step": 20, "train/loss": 1.5, "moe/layer00/load": [1.0, 1.0], "moe/idle_time": 0.4},
        {"step": 30, "train/loss": 1.0, "moe/layer00/load": [1.0, 1.0, 1.0, 1.0], "moe/idle_time": 0.3},
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


REPORT_CASES = {
    "missing_run": ("{d}/nowhere", "no such run directory"),
    "not_a_run": ("{d}", "neither log.jsonl nor tb/ found"),
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report(case, tmp_path, capsys):
    target, cause = REPORT_CASES[case]
    assert_one_line(capsys, ["report", target.format(d=tmp_path), "--json"], cause, "aoe-ep: report error: ")


def test_report_leaves_out_a_malformed_record_and_prints_json(malformed_run, capsys):
    assert main(["report", str(malformed_run), "--json"]) == 0
    captured = capsys.readouterr()
    assert (
        "the record of step 20 is malformed (moe/layer00/load: 2 values where the other records have 4)" in captured.err
    )
    summary = json.loads(captured.out)  # strict JSON: no bare NaN
    assert summary["last_step"] == 30 and summary["final_loss"] == 1.0
    assert summary["final_valid_loss"] is None and summary["perplexity"] is None


def test_report_json_holds_null_for_nan(malformed_run, capsys):
    records = [{"step": 10, "train/loss": float("nan"), "moe/idle_time": 0.5}]
    (malformed_run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["report", str(malformed_run), "--json"]) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and json.loads(out)["final_loss"] is None


def test_report_failure_leaves_no_partial_folder(malformed_run, capsys, monkeypatch):
    from aoe_ep.analysis import report

    def broken(runs, out_dir):
        (out_dir / "half.png").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "FIGURES", [("broken", broken)])
    assert main(["report", str(malformed_run)]) == 130
    assert not (malformed_run / "report").exists()


PREPROCESS_CASES = {
    "device_as_input": (["--input", "/dev/zero", "--output-prefix", "{d}/out"], "/dev/zero: not a regular file"),
    "missing_input": (["--input", "{d}/nowhere.txt", "--output-prefix", "{d}/out"], "no such file or directory"),
    "unwritable_output": (["--input", "{d}/docs.txt", "--output-prefix", "/proc/foo/out"], "/proc/foo/out"),
}


@pytest.mark.parametrize("case", sorted(PREPROCESS_CASES))
def test_preprocess(case, tmp_path, capsys):
    (tmp_path / "docs.txt").write_text("def f(x):\n    return x\n")
    argv, cause = PREPROCESS_CASES[case]
    assert_one_line(capsys, ["preprocess", *(a.format(d=tmp_path) for a in argv)], cause)


@pytest.mark.parametrize("case", ["unwritable_out", "out_is_a_file"])
def test_toy(case, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = "/proc/foo" if case == "unwritable_out" else f"{tmp_path}/file"
    assert_one_line(
        capsys,
        ["toy", "--out", out, "--stage1-steps", "1", "--stage2-steps", "1"],
        f"--out {out}",
        "aoe-ep toy: error: ",
    )


def test_plan_skips_the_layouts_the_batch_does_not_divide(capsys):
    assert main(["plan", "tiny"]) == 0
    captured = capsys.readouterr()
    assert "aoe-ep plan: skipped 7 layout(s) the batch does not divide: EP 1 x DP 4;" in captured.err
    rows = [line.split()[:2] for line in captured.out.splitlines() if line.strip()[:1].isdigit()]
    assert ["1", "1"] in rows and ["2", "1"] in rows and all(r[1] == "1" for r in rows)


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "aoe-ep", "--model_args", "checkpoint=runs/tiny", "--tasks", "arc_easy"],
        ["--help"],
        ["--", "--model", "aoe-ep"],
    ],
)
def test_lm_eval_passes_every_argument_on(argv, monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "aoe_ep.eval.harness", types.SimpleNamespace(main=seen.append))
    assert main(["lm-eval", *argv]) == 0
    assert seen == [argv[1:] if argv[0] == "--" else argv]
