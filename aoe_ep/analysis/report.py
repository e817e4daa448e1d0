"""`aoe-ep report RUN_DIR [--out DIR] [--compare RUN ...] [--steps S ...] [--json]`: a run's load report.

Reads the run's log (`aoe_ep.train.run_log`), writes `report.html` and one PNG per figure
(`aoe_ep.analysis.report_figures`) into DIR (default `<RUN_DIR>/report`), and returns the summary:

    final_loss          the last logged train/loss (mean of its logging window)
    final_valid_loss    the last logged valid/loss (None without validation)
    perplexity          exp(final_valid_loss)
    idle_time_expert    mean over the logged steps of moe/idle_time (Σ layers of max − min load per expert)
    idle_time_device    mean over the logged steps of moe/idle_time_device (the same per EP rank)
    worst_layer         the layer with the largest mean max − min load over the logged steps
    worst_layer_max_minus_min, mean_max_minus_min (per layer), last_step, logged_steps, scorer,
    expert_parallel_size, run, source

With --compare the printed JSON is the main run's summary with "compare": [summary of each other run] added.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from aoe_ep.analysis import report_figures as figs
from aoe_ep.train.run_log import ReportError, RunLog, read_run


def _last(run: RunLog, key: str) -> Optional[float]:
    steps, values = run.series(key)
    return float(values[-1]) if steps else None


def _mean(run: RunLog, key: str) -> Optional[float]:
    steps, values = run.series(key)
    return float(np.mean(values)) if steps else None


def _layer_mean(run: RunLog, metric: str) -> Optional[float]:
    """The mean over layers of each layer's mean over the logged windows of `metric` (None where none logs it)."""
    means = [float(np.mean(values)) for _, values in run.layer_series(metric).values()]
    return float(np.mean(means)) if means else None


def summarize(run: RunLog) -> dict:
    spread = {layer: float(np.mean(values)) for layer, (_, values) in run.layer_series("max_minus_min").items()}
    worst = max(spread, key=lambda layer: (spread[layer], -layer)) if spread else None
    valid = _last(run, "valid/loss")
    return {
        "run": str(run.path),
        "source": run.source,
        "scorer": run.scorer,
        "expert_parallel_size": run.ep_size,
        "last_step": max(run.records),
        "logged_steps": len(run.series("moe/idle_time")[0]) or len(run.series("train/loss")[0]),
        "final_loss": _last(run, "train/loss"),
        "final_valid_loss": valid,
        "perplexity": math.exp(min(valid, 50.0)) if valid is not None else None,
        "idle_time_expert": _mean(run, "moe/idle_time"),
        "idle_time_device": _mean(run, "moe/idle_time_device"),
        "worst_layer": worst,
        "worst_layer_max_minus_min": spread[worst] if worst is not None else None,
        "mean_max_minus_min": {str(layer): v for layer, v in spread.items()},
        "ent_load": _layer_mean(run, "ent_load"),
        "ent_conf": _layer_mean(run, "ent_conf"),
        "experts_per_token": _experts_per_token(run),
        "erc_eps": _layer_mean(run, "erc_eps"),
        "threshold_density": _layer_mean(run, "density"),
    }


def _experts_per_token(run: RunLog) -> Optional[float]:
    """Σ tokens_per_expert / tokens over the logged windows and layers: K under top-K, the fired experts per token
    under threshold selection (where a token may use 0..n)."""
    n = run.section("moe").get("num_experts")
    density = _layer_mean(run, "density")
    if density is not None and n:
        return density * n
    k = run.section("moe").get("top_k")
    return float(k) if k and run.section("moe").get("selection", "top_k") == "top_k" else None


SUMMARY_ROWS = (
    ("final_loss", "final training loss", "{:.4f}"),
    ("final_valid_loss", "final validation loss", "{:.4f}"),
    ("perplexity", "validation perplexity", "{:.3f}"),
    ("idle_time_expert", "mean idle time per expert", "{:.4f}"),
    ("idle_time_device", "mean idle time per device", "{:.4f}"),
    ("worst_layer", "worst layer", "{}"),
    ("worst_layer_max_minus_min", "its mean max − min load", "{:.4f}"),
    ("ent_load", "mean Ent_load (Eq. 7; layers, windows)", "{:.4f}"),
    ("ent_conf", "mean Ent_conf (Eq. 8)", "{:.4f}"),
    ("experts_per_token", "experts per token", "{:.2f}"),
    ("erc_eps", "mean ERC ε", "{:.4f}"),
    ("threshold_density", "mean threshold density ρ", "{:.4f}"),
    ("last_step", "last step", "{}"),
    ("logged_steps", "logged windows", "{}"),
    ("scorer", "scorer", "{}"),
    ("expert_parallel_size", "expert-parallel size", "{}"),
)


def _cell(value, fmt: str) -> str:
    return "—" if value is None else html.escape(fmt.format(value))


def summary_table(summaries: Sequence[dict], names: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{label}</td>" + "".join(f"<td>{_cell(s.get(key), fmt)}</td>" for s in summaries) + "</tr>"
        for key, label, fmt in SUMMARY_ROWS
    )
    return f"<table><tr><th></th>{head}</tr>{rows}</table>"


STYLE = (
    "body{font-family:sans-serif;max-width:1400px;margin:1em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 10px;text-align:right}"
    "td:first-child{text-align:left}figure{margin:2em 0}img{max-width:100%}figcaption{color:#444;"
    "max-width:60em}.note{color:#a40}"
)


def render_html(
    runs: Sequence[RunLog], summaries: Sequence[dict], figures: Sequence[figs.Figure], skipped: Sequence[str]
) -> str:
    names = [r.name for r in runs]
    notes = [f"{r.name}: {n}" for r in runs for n in r.notes] + list(skipped)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>aoe-ep report: {html.escape(names[0])}"
        f"</title><style>{STYLE}</style></head><body>",
        f"<h1>aoe-ep report: {html.escape(', '.join(names))}</h1>",
        f"<p>{html.escape(', '.join(str(r.path) for r in runs))}; generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} from the records logged so far.</p>",
        summary_table(summaries, names),
    ]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    for f in figures:
        parts.append(
            f"<figure><h2>{html.escape(f.title)}</h2><img src='{f.file}' alt='{html.escape(f.title)}'>"
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


FIGURES = (
    ("loss", figs.loss_figure),
    ("load heatmaps", None),
    ("load over training", figs.load_over_training_figure),
    ("device load", figs.device_load_figure),
    ("idle time", figs.idle_time_figure),
    ("entropy", figs.entropy_figure),
    ("scores", figs.scores_figure),
    ("wait", figs.wait_figure),
    ("bytes per collective", figs.comm_figure),
    ("diagnostics", figs.diagnostics_figure),
    ("bias", figs.bias_figure),
)


def write_report(
    run_dir: str | Path,
    out: Optional[str | Path] = None,
    compare: Sequence[str | Path] = (),
    steps: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> dict:
    """Write report.html and its PNGs; returns the main run's summary (with "compare" when given) and "out"."""
    runs = [read_run(run_dir)] + [read_run(c) for c in compare]
    out_dir = Path(out) if out is not None else Path(run_dir) / "report"
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"--out {out_dir}: cannot create it ({err.strerror})") from None
    try:
        return _write(runs, out_dir, compare, steps, progress)
    except BaseException:
        if created:  # no partial report folder
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def json_safe(value):
    """NaN and infinities (not JSON) as null, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _write(
    runs: list[RunLog], out_dir: Path, compare: Sequence[str | Path], steps: Optional[Sequence[int]], progress: bool
) -> dict:
    summaries = [summarize(r) for r in runs]
    figures, skipped = [], []
    with tqdm(FIGURES, desc="report", unit="figure", disable=not progress, dynamic_ncols=True) as bar:
        for name, draw in bar:
            figure = figs.load_heatmaps_figure(runs, out_dir, steps) if draw is None else draw(runs, out_dir)
            if figure is None:
                skipped.append(f"{name}: not logged by {'this run' if len(runs) == 1 else 'these runs'}, left out")
            else:
                figures.append(figure)
    (out_dir / "report.html").write_text(render_html(runs, summaries, figures, skipped))
    result = dict(summaries[0])
    if compare:
        result["compare"] = summaries[1:]
    (out_dir / "summary.json").write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
    result["out"] = str(out_dir)
    return result


def describe(summary: dict) -> str:
    """One line per run for the terminal."""
    lines = []
    for s in [summary] + list(summary.get("compare", [])):
        parts = [f"{s['run']} (step {s['last_step']})"]
        for key, label, fmt in SUMMARY_ROWS[:6]:
            if s.get(key) is not None:
                parts.append(f"{label} {fmt.format(s[key])}")
        lines.append(": ".join(parts[:1]) + ": " + ", ".join(parts[1:]))
    return "\n".join(lines)
