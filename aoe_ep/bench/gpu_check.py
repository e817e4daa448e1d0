"""`python -m aoe_ep.bench.gpu_check OUT_DIR`: the GPU checks of `launch/gpu_check.sh`, sized for a few minutes on
one GPU. Each part runs under its own time limit and records its result (or its error) in OUT_DIR/gpu_check.json;
the short table printed last summarises them.

Parts: the `gpu` tests (pytest -m gpu); `aoe-ep bench layer --device cuda --dtype bfloat16` on
configs/bench/gpu.yaml; tokens/s and MFU of the tiny model and of a 4-layer slice of the 732M AoE and MoE models
(`aoe-ep train` on the built-in corpus, from its log); the routed MoE layer against megatron-core's `MoELayer`;
the levers (`aoe_ep.bench.train`): activation checkpointing none, selective and full, and compiled blocks, side by
side in bf16 on the tiny model and the two slices, with tokens/s, kept activation bytes and the allocator's peak.
`--device cpu` runs the same plumbing on the CPU with small sizes in fp32; `--only levers` runs the levers alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from aoe_ep.config import CONFIGS_DIR, ConfigError

# The source checkout: the `gpu` tests live in its tests/gpu, not in the installed package.
ROOT = Path(__file__).resolve().parents[2]

# The levers part: (sequences, tokens per sequence) of one micro-batch per model of `aoe_ep.bench.train.MODELS`. On
# CUDA the slices take the micro-batch of their training runs below (8 x 2048 = 16,384 tokens, about 10 TFLOP a
# step: tens of milliseconds on an H200, so compiling, not the few timed rounds, takes most of the part's time).
LEVERS = {
    "cuda": {"tiny (AoE)": (16, 128), "732M slice, AoE": (8, 2048), "732M slice, MoE": (8, 2048)},
    "cpu": {"tiny (AoE)": (2, 32)},
}
LEVERS_ROUNDS = {"cuda": 3, "cpu": 1}


def _run(cmd: list[str], timeout: float, log: Path, cwd: Path | None = None) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - start


def _pytest(out: Path, timeout: float) -> dict:
    if not (ROOT / "tests" / "gpu").is_dir():
        return {"skipped": "no tests/gpu next to this aoe_ep (an installed wheel): run from a source checkout"}
    xml = out / "gpu_tests.xml"
    rc, seconds = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu", f"--junitxml={xml}"],
        timeout,
        out / "gpu_tests.log",
        cwd=ROOT,
    )
    result = {"rc": rc, "seconds": seconds}
    if xml.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    return result


def _bench(out: Path, device: str, dtype: str, timeout: float, cases: str) -> dict:
    path = out / "bench_layer.json"
    cmd = [
        sys.executable,
        "-m",
        "aoe_ep.cli",
        "bench",
        "layer",
        "--device",
        device,
        "--dtype",
        dtype,
        "--cases",
        cases,
        "--out",
        str(path),
    ]
    if device == "cpu":
        cmd += ["--tokens", "64", "--iters", "1", "--rounds", "1"]
    rc, seconds = _run(cmd, timeout, out / "bench_layer.log")
    result = {"rc": rc, "seconds": seconds}
    if path.exists():
        result["cases"] = [
            {
                "case": r["case"]["name"],
                "tokens_per_s": r["tokens_per_s"],
                "ratios": {q["pair"]: [q["measured"], q["bound"]] for q in r["ratios"]},
                "peak_bytes": {k: v.get("peak_bytes") for k, v in r["memory"].items()},
            }
            for r in json.loads(path.read_text())
        ]
    return result


def _train(out: Path, name: str, config: str, overrides: list[str], timeout: float) -> dict:
    run_dir = out / f"run_{name}"
    cmd = [
        sys.executable,
        "-m",
        "aoe_ep.cli",
        "train",
        "--config",
        config,
        "--set",
        f"train.out_dir={run_dir}",
        "--set",
        "train.eval_interval=100000",
        "--set",
        "train.save_interval=100000",
        *[a for o in overrides for a in ("--set", o)],
    ]
    rc, seconds = _run(cmd, timeout, out / f"train_{name}.log")
    result = {"rc": rc, "seconds": seconds}
    log = run_dir / "log.jsonl"
    if log.exists():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        timed = [r for r in records if "perf/tokens_per_s" in r][1:] or records  # the first window compiles/warms
        if timed:
            last = timed[-1]
            result.update(
                {
                    k.split("/")[-1]: last[k]
                    for k in ("perf/tokens_per_s", "perf/mfu", "perf/peak_memory_gib", "train/loss")
                    if k in last
                }
            )
    return result


def levers(device: str, dtype: str, rounds: int, shapes: dict[str, tuple[int, int]], contenders=None) -> dict:
    """Activation checkpointing none/selective/full and compiled blocks side by side (`aoe_ep.bench.train`), each
    model of `shapes` on micro-batches of its shape, computing in `dtype` ("bfloat16" under autocast, or "float32"):
    per model and contender tokens/s, kept activation bytes, the CUDA allocator's peak, and the ratios to `none`.
    Where this machine cannot compile, the compiled contender is left out and `compile_error` says why."""
    import torch

    from aoe_ep.bench.train import CONTENDERS, bench_model
    from aoe_ep.train.compile import check_compile

    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype: must be 'bfloat16' or 'float32', got {dtype!r}")
    dev = torch.device(device)
    contenders = tuple(contenders or CONTENDERS)
    result: dict = {"dtype": dtype, "rounds": rounds, "shapes": {name: list(shape) for name, shape in shapes.items()}}
    if "compiled" in contenders:
        try:
            check_compile(dev)
        except ConfigError as err:
            result["compile_error"] = str(err)
            contenders = tuple(c for c in contenders if c != "compiled")
    result["contenders"] = list(contenders)
    result["rows"] = [
        asdict(row)
        for name, shape in shapes.items()
        for row in bench_model(name, rounds, dev, contenders, dtype=getattr(torch, dtype), shape=shape)
    ]
    return result


def _levers(out: Path, device: str, timeout: float) -> dict:
    """The levers part in its own process (`--only levers`), under `timeout`: its result from OUT/levers.json."""
    path = out / "levers.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "aoe_ep.bench.gpu_check", str(out), "--device", device, "--only", "levers"]
    rc, seconds = _run(cmd, timeout, out / "levers.log")
    result = {"rc": rc, "seconds": seconds}
    if path.exists():
        result.update(json.loads(path.read_text()))
    return result


def _levers_only(out: Path, device: str) -> int:
    cuda = device == "cuda"
    # on the CPU without the compiled contender: compiling C++ kernels would take most of the check's time
    contenders = None if cuda else ("none", "selective", "full")
    result = levers(device, "bfloat16" if cuda else "float32", LEVERS_ROUNDS[device], LEVERS[device], contenders)
    (out / "levers.json").write_text(json.dumps(result, indent=2))
    print_table({"device": device, "levers": result})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory for gpu_check.json and the logs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--only", choices=["levers"], help="run this part alone (writes OUT/levers.json)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.only == "levers":
        return _levers_only(out, args.device)
    cuda = args.device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    results: dict = {"device": args.device}
    started = time.perf_counter()

    def save() -> None:
        results["seconds"] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))

    results["tests"] = _pytest(out, 150) if cuda else {"skipped": "cpu"}
    save()
    results["bench_layer"] = _bench(
        out,
        args.device,
        dtype,
        120 if cuda else 300,
        str(CONFIGS_DIR / "bench" / ("gpu.yaml" if cuda else "layer.yaml")),
    )
    save()
    common = [f"train.device={args.device}", f"train.precision={'bf16' if cuda else 'fp32'}", "train.log_interval=5"]
    tiny_steps = 60 if cuda else 30
    results["train_tiny"] = _train(out, "tiny", "tiny", common + [f"train.max_steps={tiny_steps}"], 90)
    save()
    slice_ = [
        "model.n_layers=4",
        "train.max_steps=15" if cuda else "train.max_steps=4",
        "train.global_batch_tokens=16384" if cuda else "train.global_batch_tokens=512",
        "train.micro_batch_size=8" if cuda else "train.micro_batch_size=2",
        "data.seq_len=2048" if cuda else "data.seq_len=64",
        "train.warmup_steps=2",
    ]
    if not cuda:
        slice_ += [
            "model.d_model=64",
            "model.n_heads=4",
            "moe.d_ffn=64",
            "moe.d_low=16",
            "model.max_seq_len=64",
            "model.vocab_size=300",
        ]
    for name, preset in (("aoe_732m_4layers", "paper/aoe_732m"), ("moe_732m_4layers", "paper/moe_732m")):
        results[f"train_{name}"] = _train(out, name, preset, common + slice_, 100)
        save()
    if cuda:
        try:
            from aoe_ep.bench.megatron_moe import compare

            results["megatron_moe"] = compare()
        except Exception as err:
            results["megatron_moe"] = {"error": f"{type(err).__name__}: {err}"}
        save()
    results["levers"] = _levers(out, args.device, 120 if cuda else 300)
    save()
    print_table(results)
    return 0 if all(r.get("rc", 0) == 0 for r in results.values() if isinstance(r, dict)) else 1


def _lever_rows(levers: dict) -> list[tuple[str, str]]:
    """One table row per model and contender of the levers part: tokens/s and memory, each also against `none`."""
    if not levers:
        return []
    if not levers.get("rows"):
        return [("levers", f"rc {levers.get('rc')} (see levers.log)")]
    rows = []
    for r in levers["rows"]:
        peak = f", peak {r['peak_bytes'] / 2**20:,.0f} MiB" if r.get("peak_bytes") is not None else ""
        rows.append(
            (
                f"{r['model']}: {r['contender']}"[:44],
                f"{r['tokens_per_s']:,.0f} tokens/s ({r['speed_vs_none']:.2f} of none), kept "
                f"{r['kept_bytes'] / 2**20:,.1f} MiB ({r['memory_vs_none']:.2f}){peak}",
            )
        )
    if "compile_error" in levers:
        rows.append(("levers: compiled", levers["compile_error"][:100]))
    return rows


def print_table(results: dict) -> None:
    rows = []
    t = results.get("tests", {})
    if "tests" in t:
        rows.append(
            (
                "gpu tests",
                f"{t['tests'] - t['failures'] - t['errors'] - t['skipped']} passed, "
                f"{t['failures'] + t['errors']} failed, {t['skipped']} skipped ({t['seconds']:.0f} s)",
            )
        )
    for case in results.get("bench_layer", {}).get("cases", []):
        ratios = case["ratios"]
        picks = [p for p in ("aoe/moe", "moe/dense", "moe/experts", "aoe/loop_reference") if p in ratios]
        rows.append((case["case"][:44], "  ".join(f"{p} {ratios[p][0]:.2f} ({ratios[p][1]:.2f})" for p in picks)))
    for key in ("train_tiny", "train_aoe_732m_4layers", "train_moe_732m_4layers"):
        r = results.get(key, {})
        if "tokens_per_s" in r:
            mfu = f", MFU {r['mfu']:.3f}" if "mfu" in r else ""
            rows.append((key[6:], f"{r['tokens_per_s']:,.0f} tokens/s{mfu}, loss {r.get('loss', float('nan')):.3f}"))
        elif r:
            rows.append((key[6:], f"rc {r.get('rc')} (see its log)"))
    m = results.get("megatron_moe", {})
    if "aoe_ep/megatron" in m:
        rows.append(
            ("vs megatron MoELayer", f"aoe-ep/megatron speed {m['aoe_ep/megatron']:.2f} ({m.get('megatron_experts')})")
        )
    elif m:
        rows.append(("vs megatron MoELayer", m.get("megatron_error") or m.get("error", "?")))
    rows += _lever_rows(results.get("levers", {}))
    width = max((len(a) for a, _ in rows), default=10)
    print(f"\n== aoe-ep GPU check ({results['device']}, {results.get('seconds', 0):.0f} s) ==")
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
