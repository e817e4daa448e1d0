"""`aoe-ep plan --placement RUN_DIR`: what a balanced expert placement would gain on a run's measured load.

The load is the run's latest checkpoint's record (`expert_load` in meta.json: the global tokens per expert since
the checkpoint before it, recency-weighted as the trainer chooses its placement from), or, without one, the per-expert
load of its log.jsonl summed over the logged windows
(either format, as `aoe_ep.train.run_log` reads them: `"moe/layer00/load": [..]` lists, or one scalar tag
`moe/layer00/load/expert3` per expert). Per
layer it prints the per-device max − min of that load under the contiguous split, under the placement the run
used (when the checkpoint records it), and under `balanced_placement`; their sums are the per-device idle-time
metric, and the predicted gain is contiguous − balanced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from aoe_ep.moe.placement import Placement, balanced_placement


def _from_checkpoint(run_dir: Path) -> Optional[dict]:
    from aoe_ep.train.checkpoint import checkpoint_root, is_complete, latest_checkpoint, read_meta

    path = run_dir if is_complete(run_dir) else latest_checkpoint(checkpoint_root(run_dir))
    if path is None:
        return None
    meta = read_meta(path)
    entry = meta.get("expert_load") or {}
    load = entry.get("recent_tokens_per_expert") or entry.get("tokens_per_expert")
    if not load or not sum(map(sum, load)):
        return None
    used = (meta.get("expert_placement") or {}).get("layers")
    return {
        "counts": torch.tensor(load, dtype=torch.float64),
        "ep": meta.get("expert_parallel_size"),
        "used": used,
        "source": f"{path}/meta.json (steps {meta['expert_load'].get('since_step')}-{meta['step']})",
    }


def _from_log(run_dir: Path) -> Optional[dict]:
    """The per-expert load of the run's log (`aoe_ep.train.run_log` reads both formats) summed over its windows."""
    from aoe_ep.train.run_log import ReportError, read_run

    try:
        run = read_run(run_dir)
    except ReportError:
        return None
    per_layer = run.layer_series("load")
    rows = {
        i: [sum(col) for col in zip(*values)]
        for i, (_, values) in per_layer.items()
        if values and all(isinstance(v, list) for v in values)
    }
    if not rows:
        return None
    ep = run.ep_size if run.ep_size > 1 else None
    if ep is None:  # no config or run.json: the length of the logged per-device load
        lengths = {
            len(v) for _, values in run.layer_series("device_load").values() for v in values if isinstance(v, list)
        }
        ep = max(lengths) if lengths else None
    windows = max(len(steps) for steps, _ in per_layer.values())
    return {
        "counts": torch.tensor([rows[i] for i in sorted(rows)], dtype=torch.float64),
        "ep": ep,
        "used": None,
        "source": f"{run.source} ({windows} logged windows)",
    }


def measured_load(run_dir: str | Path) -> dict:
    """{"counts" [L, n], "ep" (the run's EP size when known), "used" (its placement), "source"}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--placement {run_dir}: not a directory")
    found = _from_checkpoint(run_dir) or _from_log(run_dir)
    if found is None:
        raise ValueError(
            f"--placement {run_dir}: no measured load (no checkpoint recording `expert_load` and no "
            f"per-expert load in log.jsonl)"
        )
    return found


def placement_gain(run_dir: str | Path, ep: Optional[int] = None) -> dict:
    """Per layer: spread under contiguous / the run's placement / balanced, and the idle-time totals."""
    found = measured_load(run_dir)
    ep = ep or found["ep"]
    counts = found["counts"]
    num_experts = counts.shape[1]
    if not ep or ep < 2:
        raise ValueError("--placement: the run's expert-parallel size is unknown or 1; pass --ep N (N >= 2)")
    if num_experts % ep:
        raise ValueError(f"--ep {ep}: {num_experts} experts cannot be split over {ep} devices")
    contiguous = Placement.contiguous(num_experts, ep)
    used = found["used"] if found["used"] and ep == found["ep"] else None
    layers = []
    for i, row in enumerate(counts):
        load = row / row.sum().clamp_min(1e-12)
        balanced = balanced_placement(row, ep)
        entry = {
            "layer": i,
            "contiguous": contiguous.spread(load),
            "balanced": balanced.spread(load),
            "placement": balanced.as_lists(),
            "load": [round(v, 6) for v in load.tolist()],
        }
        if used is not None:
            entry["current"] = Placement.of(used[i]).spread(load)
        layers.append(entry)
    total_c = sum(layer["contiguous"] for layer in layers)
    total_b = sum(layer["balanced"] for layer in layers)
    out = {
        "source": found["source"],
        "ep": ep,
        "num_experts": num_experts,
        "layers": layers,
        "idle_time_device_contiguous": total_c,
        "idle_time_device_balanced": total_b,
        "predicted_gain": total_c - total_b,
        "predicted_gain_relative": (total_c - total_b) / total_c if total_c > 0 else 0.0,
    }
    if used is not None:
        out["idle_time_device_current"] = sum(layer["current"] for layer in layers)
    return out


def render_gain(gain: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(gain, indent=2)
    current = "idle_time_device_current" in gain
    lines = [
        f"measured load: {gain['source']}; {gain['num_experts']} experts over EP {gain['ep']}",
        "per-device max - min load per layer:",
        f"{'layer':>5} {'contiguous':>11}"
        + (f" {'current':>9}" if current else "")
        + f" {'balanced':>9}  balanced placement (experts per rank)",
    ]
    for layer in gain["layers"]:
        lines.append(
            f"{layer['layer']:>5} {layer['contiguous']:>11.4f}"
            + (f" {layer['current']:>9.4f}" if current else "")
            + f" {layer['balanced']:>9.4f}  {layer['placement']}"
        )
    lines.append(
        f"{'sum':>5} {gain['idle_time_device_contiguous']:>11.4f}"
        + (f" {gain['idle_time_device_current']:>9.4f}" if current else "")
        + f" {gain['idle_time_device_balanced']:>9.4f}  (the per-device idle-time metric)"
    )
    lines.append(
        f"predicted idle-time gain of parallel.expert_placement=balanced: {gain['predicted_gain']:.4f} "
        f"({100 * gain['predicted_gain_relative']:.1f}% of contiguous) on this load itself; the steps that "
        f"follow gain less as routing moves"
    )
    return "\n".join(lines)
