"""The figures of `aoe-ep report`, one PNG each, drawn for one run or side by side for several (overlaid curves, or
one column per run). A figure whose data no run logged is left out (None), so that older logs and other helpers'
optional keys (AoE diagnostics, the balancing bias) work either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aoe_ep.analysis.comm_expected import expected_bytes_per_step  # noqa: E402
from aoe_ep.log_keys import layer_key  # noqa: E402
from aoe_ep.train.run_log import RunLog  # noqa: E402

DPI = 90
LOAD_CMAP = "coolwarm"  # load × E from 0 (blue, idle) through 1 (white-grey, balanced) to 2 or more (red)
PANEL_W, PANEL_H = 5.2, 2.4

# Optional per-layer scalars other parts of the trainer may log, with their axis labels.
DIAGNOSTICS = (
    ("score_margin", "score margin K-th − (K+1)-th"),
    ("churn", "top-K churn (share of probe tokens)"),
    ("dead_experts", "dead experts"),
    ("wasted_precompute", "wasted low-rank precompute (share)"),
)


@dataclass(frozen=True)
class Figure:
    file: str
    title: str
    caption: str


def score_label(scorer: Optional[str]) -> str:
    return {
        "aoe": "mean activation norm ‖x·W_down‖",
        "router": "mean router logit",
        "self_routing": "mean self-routing logit",
    }.get(scorer or "", "mean score")


def _save(fig, out_dir: Path, file: str) -> None:
    fig.savefig(out_dir / file, dpi=DPI)
    plt.close(fig)


def _grid(rows: int, cols: int, sharey: bool | str = False):
    fig, axes = plt.subplots(
        rows, cols, figsize=(PANEL_W * cols, PANEL_H * rows), squeeze=False, sharey=sharey, layout="constrained"
    )
    return fig, axes


def _step_edges(steps: Sequence[int]) -> np.ndarray:
    s = np.asarray(steps, dtype=float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _relative_load(values: Sequence[float]) -> np.ndarray:
    load = np.asarray(values, dtype=float)
    return load * len(load)


def loss_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    if not any(r.has("train/loss") or r.has("valid/loss") for r in runs):
        return None
    fig, axes = _grid(1, 1)
    ax = axes[0, 0]
    for i, run in enumerate(runs):
        colour = f"C{i}"
        for key, style, what in (("train/loss", "-", "train"), ("valid/loss", "--o", "valid")):
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, style, color=colour, markersize=3, label=f"{run.name} {what}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, out_dir, "loss.png")
    return Figure(
        "loss.png",
        "Training and validation loss",
        "Training loss (mean over each logging window, solid) and validation loss (dashed), log scale.",
    )


def chosen_steps(run: RunLog, wanted: Optional[Sequence[int]]) -> list[int]:
    """The logged steps with a load record nearest to `wanted` (default: first, middle and last)."""
    steps = sorted({s for _, (ss, _) in run.layer_series("load").items() for s in ss})
    if not steps:
        return []
    if not wanted:
        return sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    return sorted({min(steps, key=lambda s: (abs(s - w), s)) for w in wanted})


def _load_matrix(run: RunLog, step: int) -> Optional[np.ndarray]:
    rows = [run.records[step].get(layer_key(layer, "load")) for layer in run.layers()]
    rows = [r for r in rows if r is not None]
    return np.stack([_relative_load(r) for r in rows]) if rows else None


def _annotate(ax, matrix: np.ndarray) -> None:
    if matrix.shape[0] * matrix.shape[1] > 128:
        return
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)


def load_heatmaps_figure(runs: list[RunLog], out_dir: Path, steps: Optional[Sequence[int]]) -> Optional[Figure]:
    per_run = [[(s, _load_matrix(r, s)) for s in chosen_steps(r, steps)] for r in runs]
    if not any(per_run):
        return None
    rows = max(len(p) for p in per_run)
    vmax = 2.0  # load × E: 1 (balanced) in the middle of the diverging colour map; above 2 saturates
    fig, axes = _grid(rows, len(runs))
    image = None
    for col, (run, cells) in enumerate(zip(runs, per_run)):
        for row in range(rows):
            ax = axes[row, col]
            if row >= len(cells) or cells[row][1] is None:
                ax.axis("off")
                continue
            step, matrix = cells[row]
            image = ax.imshow(matrix, cmap=LOAD_CMAP, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
            _annotate(ax, matrix)
            ax.set_title(f"{run.name}: step {step}", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            ax.set_xticks(range(matrix.shape[1]) if matrix.shape[1] <= 16 else ax.get_xticks()[1:-1])
            ax.set_yticks(range(matrix.shape[0]) if matrix.shape[0] <= 16 else ax.get_yticks()[1:-1])
    fig.colorbar(image, ax=axes, label="load × E (1 = uniform)", shrink=0.8)
    _save(fig, out_dir, "load_heatmaps.png")
    return Figure(
        "load_heatmaps.png",
        "Load per layer and expert at chosen steps",
        "Share of the routed (token, expert) rows each expert took in the logging window ending at that "
        "step, times the number of experts: 1 (grey) is a perfectly balanced expert, 0 (blue) an idle "
        "one, 2 or more (red) twice its share.",
    )


def _layer_grid(
    runs: list[RunLog], metric: str, draw: Callable, out_dir: Path, file: str, sharey: bool | str = "row"
) -> bool:
    """One row per layer, one column per run that logged `metric`; `draw(ax, run, steps, values)` fills a panel."""
    logged = [(r, series) for r in runs if (series := r.layer_series(metric))]
    if not logged:
        return False
    runs, per_run = [r for r, _ in logged], [series for _, series in logged]
    layers = sorted({layer for p in per_run for layer in p})
    fig, axes = _grid(len(layers), len(runs), sharey=sharey)
    for col, (run, series) in enumerate(zip(runs, per_run)):
        for row, layer in enumerate(layers):
            ax = axes[row, col]
            if layer not in series:
                ax.axis("off")
                continue
            draw(ax, run, *series[layer])
            ax.set_title(f"{run.name}: layer {layer}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    _save(fig, out_dir, file)
    return True


def _heatmap_over_steps(
    ax, matrix_SE: np.ndarray, steps: Sequence[int], cmap: str, vmin: float, vmax: float, label: str, fig=None
):
    edges_x = _step_edges(steps)
    edges_y = np.arange(matrix_SE.shape[1] + 1) - 0.5
    mesh = ax.pcolormesh(edges_x, edges_y, matrix_SE.T, cmap=cmap, vmin=vmin, vmax=vmax, shading="flat")
    ax.set_ylabel("expert")
    plt.colorbar(mesh, ax=ax, label=label, pad=0.01)
    return mesh


def load_over_training_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    def draw(ax, run, steps, values):
        matrix = np.stack([_relative_load(v) for v in values])
        _heatmap_over_steps(ax, matrix, steps, LOAD_CMAP, 0.0, 2.0, "load × E")

    if not _layer_grid(runs, "load", draw, out_dir, "load_over_training.png", sharey=False):
        return None
    return Figure(
        "load_over_training.png",
        "Load per expert over training (AoE paper, Fig. 3)",
        "Per layer (rows) and run (columns): each expert's load × E in every logging window; a "
        "band that stays red is an expert that keeps more than its share, a blue one an expert left idle.",
    )


def device_load_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    def draw(ax, run, steps, values):
        matrix = np.asarray(values, dtype=float)
        for k in range(matrix.shape[1]):
            ax.plot(steps, matrix[:, k], label=f"device {k}")
        ax.axhline(1.0 / matrix.shape[1], color="k", lw=0.8, ls=":")
        ax.set_ylabel("share of rows")
        ax.legend(fontsize=7, ncol=min(4, matrix.shape[1]))
        ax.grid(alpha=0.3)

    if not _layer_grid(runs, "device_load", draw, out_dir, "device_load.png"):
        return None
    return Figure(
        "device_load.png",
        "Load per device over training",
        "Share of each layer's routed rows that each expert-parallel rank computed (dotted: the even "
        "share 1/EP). Only runs with EP > 1 log it.",
    )


def idle_time_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    keys = (("moe/idle_time", "per expert"), ("moe/idle_time_device", "per device"))
    if not any(r.has(k) for r in runs for k, _ in keys):
        return None
    fig, axes = _grid(1, 2, sharey=True)
    for j, (key, what) in enumerate(keys):
        ax = axes[0, j]
        for i, run in enumerate(runs):
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, color=f"C{i}", label=f"{run.name} (mean {np.mean(values):.3f})")
        ax.set_title(f"idle time {what}: Σ over layers of max − min load", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out_dir, "idle_time.png")
    return Figure(
        "idle_time.png",
        "Idle-time metric per expert and per device",
        "The paper's idle time: per layer max − min of the load, summed over layers; per device it sums "
        "the experts each rank holds first (0 at EP = 1).",
    )


def _lines_per_layer(
    runs: list[RunLog],
    metrics: Sequence[tuple[str, str]],
    out_dir: Path,
    file: str,
    reference: Optional[Callable[[RunLog, str], Optional[float]]] = None,
) -> bool:
    present = [(m, label) for m, label in metrics if any(r.layer_series(m) for r in runs)]
    if not present:
        return False
    runs = [r for r in runs if any(r.layer_series(m) for m, _ in present)]
    fig, axes = _grid(len(present), len(runs), sharey="row")
    for col, run in enumerate(runs):
        for row, (metric, label) in enumerate(present):
            ax = axes[row, col]
            series = run.layer_series(metric)
            if not series:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
            for layer, (steps, values) in series.items():
                ax.plot(
                    steps,
                    values,
                    color=plt.cm.viridis(0.85 * layer / max(1, len(run.layers()) - 1)),
                    label=f"layer {layer}",
                )
            ref = reference(run, metric) if reference else None
            if ref is not None:
                ax.axhline(ref, color="k", ls=":", lw=0.8)
            ax.set_title(f"{run.name}: {label}", fontsize=9)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if series and len(series) <= 12:
                ax.legend(fontsize=7, ncol=2)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    _save(fig, out_dir, file)
    return True


def entropy_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    def maximum(run: RunLog, metric: str) -> Optional[float]:
        n = run.section("moe").get("num_experts")
        return math.log(n) if n else None

    if not _lines_per_layer(
        runs, (("ent_load", "Ent_load (Eq. 7)"), ("ent_conf", "Ent_conf (Eq. 8)")), out_dir, "entropy.png", maximum
    ):
        return None
    return Figure(
        "entropy.png",
        "Ent_load and Ent_conf per layer",
        "Ent_load: entropy of the load over experts (dotted: ln E, a perfectly even load). Ent_conf: mean "
        "per-token entropy of the softmaxed scores; lower is a more confident selection.",
    )


def scores_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    def draw(ax, run, steps, values):
        matrix = np.asarray(values, dtype=float)
        for e in range(matrix.shape[1]):
            colour = plt.cm.tab10(e) if matrix.shape[1] <= 10 else plt.cm.turbo(e / (matrix.shape[1] - 1))
            ax.plot(steps, matrix[:, e], color=colour, lw=1.0, label=f"expert {e}")
        ax.set_ylabel(score_label(run.scorer), fontsize=8)
        ax.grid(alpha=0.3)
        if matrix.shape[1] <= 16:
            ax.legend(fontsize=6, ncol=4)

    if not _layer_grid(runs, "score_mean", draw, out_dir, "scores.png", sharey=False):
        return None
    labels = sorted({score_label(r.scorer) for r in runs})
    return Figure(
        "scores.png",
        "Score dynamics per expert (AoE paper, Fig. 4)",
        f"Per layer, each expert's {' / '.join(labels)} over all tokens of each logging window. For AoE it "
        "is the norm that ranks the experts; for a router MoE the router's logits.",
    )


def _predicted_expert_max(run: RunLog, step: int, expert_min: float) -> Optional[float]:
    """What the load predicts the slowest rank spends in its experts: the fastest rank's seconds scaled by the
    ratio of the most to the least loaded device (summed over layers)."""
    loads = [run.records[step].get(layer_key(layer, "device_load")) for layer in run.layers()]
    loads = [np.asarray(x, dtype=float) for x in loads if x is not None]
    if not loads:
        return None
    lo = sum(float(x.min()) for x in loads)
    return expert_min * sum(float(x.max()) for x in loads) / lo if lo > 0 else None


def wait_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    runs_with = [r for r in runs if r.has("moe/seconds/expert_max")]
    if not runs_with:
        return None
    fig, axes = _grid(2, len(runs_with), sharey="row")
    for col, run in enumerate(runs_with):
        steps, emax = run.series("moe/seconds/expert_max")
        emin = run.series("moe/seconds/expert_min")[1]
        cmax, cmin = run.series("moe/seconds/combine_max")[1], run.series("moe/seconds/combine_min")[1]
        predicted = [_predicted_expert_max(run, s, lo) for s, lo in zip(steps, emin)]
        ax = axes[0, col]
        ax.plot(steps, emax, "C0-", label="expert s, max over ranks")
        ax.plot(steps, emin, "C0:", label="expert s, min over ranks")
        ax.plot(steps, cmax, "C1-", label="combine s, max")
        ax.plot(steps, cmin, "C1:", label="combine s, min")
        if any(p is not None for p in predicted):
            ax.plot(
                steps, [np.nan if p is None else p for p in predicted], "C3--", label="expert s, max predicted by load"
            )
        ax.set_title(f"{run.name}: seconds per logged step, Σ layers", fontsize=9)
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1, col]
        ax.plot(steps, np.subtract(emax, emin), "C0-", label="measured expert max − min")
        ax.plot(steps, np.subtract(cmax, cmin), "C1-", label="measured combine max − min")
        if any(p is not None for p in predicted):
            ax.plot(
                steps,
                [np.nan if p is None else p - lo for p, lo in zip(predicted, emin)],
                "C3--",
                label="predicted by load: min × (max/min device load − 1)",
            )
        ax.set_title(f"{run.name}: the wait", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out_dir, "wait.png")
    return Figure(
        "wait.png",
        "Measured wait against what the load predicts",
        "Wall-clock seconds of the logged step in the experts and in the combine collective (where the "
        "faster ranks wait for the slowest), the max and min across ranks, summed over layers. The load's "
        "prediction scales the fastest rank's expert seconds by the ratio of the most to the least loaded "
        "device (EP > 1 only).",
    )


def comm_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    prefix = "moe/bytes_per_step/"
    runs_with = [r for r in runs if any(k.startswith(prefix) for rec in r.records.values() for k in rec)]
    if not runs_with:
        return None
    most = max(len({k for rec in r.records.values() for k in rec if k.startswith(prefix)}) for r in runs_with)
    fig, axes = plt.subplots(
        1,
        len(runs_with),
        figsize=(max(PANEL_W, 0.9 * most + 1.5) * len(runs_with), 4.2),
        squeeze=False,
        layout="constrained",
    )
    for col, run in enumerate(runs_with):
        ax = axes[0, col]
        names = sorted({k[len(prefix) :] for rec in run.records.values() for k in rec if k.startswith(prefix)})
        measured = [float(np.mean(run.series(prefix + n)[1])) for n in names]
        models = expected_bytes_per_step(run)
        bars = [("measured (mean over logs)", measured)] + [
            (label, [values.get(n, 0.0) for n in names]) for label, values in models.items()
        ]
        width = 0.8 / len(bars)
        x = np.arange(len(names))
        for j, (label, values) in enumerate(bars):
            ax.bar(x + (j - (len(bars) - 1) / 2) * width, values, width, label=label, color=f"C{j}")
        if len(bars) > 1:  # measured / the first model, above each group
            for i, (m, e) in enumerate(zip(measured, bars[1][1])):
                if e > 0:
                    ax.text(x[i], max(m, e) * 1.4, f"{m / e:.2f}×", ha="center", fontsize=7)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 4)
        ax.set_ylabel("bytes per step (rank 0)")
        ax.set_title(f"{run.name}: bytes per collective; labels: measured / uniform model", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="best")
    _save(fig, out_dir, "comm.png")
    return Figure(
        "comm.png",
        "Bytes per collective against the communication model",
        "Bytes rank 0 sent per step in each MoE collective (dispatchers' counters, fwd and bwd) next to "
        "aoe_ep/parallel/comm_model.py evaluated for the run's config under uniform routing and, for "
        "alltoall, under the logged per-device load.",
    )


def diagnostics_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    if not _lines_per_layer(runs, DIAGNOSTICS, out_dir, "diagnostics.png"):
        return None
    return Figure(
        "diagnostics.png",
        "AoE diagnostics per layer",
        "Margin between the K-th and (K+1)-th score (how decisive the selection is), top-K churn of a "
        "fixed probe batch since the previous log, experts without tokens, and the share of the low-rank "
        "precompute that unselected experts discard, where the run logged them.",
    )


def bias_figure(runs: list[RunLog], out_dir: Path) -> Optional[Figure]:
    def draw(ax, run, steps, values):
        matrix = np.asarray(values, dtype=float)
        bound = max(float(np.abs(matrix).max()), 1e-12)
        _heatmap_over_steps(ax, matrix, steps, "coolwarm", -bound, bound, "bias")

    if not _layer_grid(runs, "bias", draw, out_dir, "bias.png", sharey=False):
        return None
    return Figure(
        "bias.png",
        "Balancing bias per expert over training",
        "The per-expert bias added to the scores for selection only (aux-loss-free balancing): red "
        "raises an under-loaded expert's chance, blue lowers an over-loaded one's.",
    )
