"""A real install: a wheel built from this checkout and installed into a fresh virtual environment runs
`aoe-ep --version`, `aoe-ep params tiny` and a 2-step `aoe-ep train --config tiny` from an empty folder, with the
presets it carries as package data; an editable install and a plain checkout find the same files the same way.

Nothing is downloaded: the environments reuse this Python's packages (torch, megatron-core, ...; see `_venv`),
aoe-ep alone is installed into them (`--no-deps --no-index`), and the wheel is built without build isolation
with this Python's setuptools (launch/setup.sh installs it). The build reads a copy of the sources, so the checkout
gets no build/ or .egg-info folders.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import aoe_ep
from aoe_ep import cli

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 600  # only stops a hung command; no test here depends on how long a command takes


@pytest.fixture
def source(tmp_path) -> Path:
    """A copy of what the build reads: pyproject.toml, README.md, aoe_ep/ (with its configs link) and configs/."""
    src = tmp_path / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "aoe_ep", src / "aoe_ep", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "configs", src / "configs", ignore=ignore)
    return src


def _env(**extra: str) -> dict:
    """This environment without the checkout on PYTHONPATH, and pip kept off the network."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1", **extra)
    return env


def _run(cmd: list, cwd: Path, env: dict) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _venv(path: Path) -> Path:
    """A fresh virtual environment that sees this Python's packages (torch, megatron-core, pip, setuptools) after its
    own; its python. A .pth file adds this interpreter's site directories: the same as --system-site-packages when
    this Python is a system one, and still right when it is itself a virtual environment (whose packages
    --system-site-packages would not reach)."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], path.parent, _env())
    python = path / "bin" / "python"
    own = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], path, _env()).strip())
    parents = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    lines = "; ".join(f"site.addsitedir({d!r})" for d in parents if os.path.isdir(d))
    (own / "aoe_ep_test_parent_site.pth").write_text(f"import site; {lines}\n")
    return python


def _shipped_configs(names: list[str]) -> set[str]:
    return {n.removeprefix("aoe_ep/configs/") for n in names if n.startswith("aoe_ep/configs/")}


def _source_configs() -> set[str]:
    return {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}


def test_wheel_installed_in_a_fresh_venv_runs_from_an_empty_folder(source, tmp_path, capsys):
    dist, empty = tmp_path / "dist", tmp_path / "empty"
    empty.mkdir()
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            dist,
            source,
        ],
        tmp_path,
        _env(),
    )
    (wheel,) = dist.glob("aoe_ep-*.whl")
    assert wheel.name.startswith(f"aoe_ep-{aoe_ep.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert _shipped_configs(names) == _source_configs()
    assert {"aoe_ep/cli.py", "aoe_ep/moe/layer.py", "aoe_ep/bench/layer.py"} <= set(names)

    python = _venv(tmp_path / "venv")
    _run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], tmp_path, _env()
    )
    installed = Path(_run([python, "-c", "import aoe_ep; print(aoe_ep.__file__)"], empty, _env()).strip())
    assert installed.resolve().is_relative_to((tmp_path / "venv").resolve()), installed
    exe = tmp_path / "venv" / "bin" / "aoe-ep"

    assert _run([exe, "--version"], empty, _env()) == f"aoe-ep {aoe_ep.__version__}\n"

    assert cli.main(["params", "tiny"]) == 0
    assert _run([exe, "params", "tiny"], empty, _env()) == capsys.readouterr().out

    settings = [
        "train.device=cpu",
        "train.max_steps=2",
        "train.global_batch_tokens=512",
        "train.micro_batch_size=4",
        "train.warmup_steps=1",
        "train.log_interval=1",
        "train.eval_interval=1000",
        "train.eval_steps=1",
        "train.save_interval=1000",
        "data.default_corpus_max_bytes=400000",
        "data.split=80,20,0",
    ]
    _run(
        [exe, "train", "--config", "tiny", *[a for s in settings for a in ("--set", s)]],
        empty,
        _env(OMP_NUM_THREADS="1"),
    )
    run_dir = empty / "runs" / "tiny"
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in trained] == [1, 2]
    assert all(0 < r["train/loss"] < 10 for r in trained)
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()


LOOKUP = (
    "import aoe_ep; from aoe_ep.config import resolve_config_path as find; print(aoe_ep.__file__); "
    "print(find('tiny').resolve()); print(find('bench/layer').resolve())"
)


def _check_lookup(out: str, src: Path) -> None:
    package, tiny, cases = (Path(line) for line in out.splitlines())
    assert package.resolve() == (src / "aoe_ep" / "__init__.py").resolve()
    assert tiny == (src / "configs" / "tiny.yaml").resolve()
    assert cases == (src / "configs" / "bench" / "layer.yaml").resolve()


def test_editable_install_and_plain_checkout_find_the_presets_in_their_source(source, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    python = _venv(tmp_path / "venv")
    _run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-e", source],
        tmp_path,
        _env(),
    )
    _check_lookup(_run([python, "-c", LOOKUP], empty, _env()), source)
    _check_lookup(_run([sys.executable, "-c", LOOKUP], empty, _env(PYTHONPATH=str(source))), source)
