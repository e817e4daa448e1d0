"""A training run's log read back for `aoe-ep report`: the records of `<run>/log.jsonl` (or, without one, the
scalars of the tensorboard events under `<run>/tb`), the run's config and its layout.

Readable while the run is writing: an incomplete last line is left out. A step logged twice (a resumed run logs
again the steps after its last checkpoint) keeps the value written last, as tensorboard's purge does. Logs of the
earlier format, one scalar per expert (`moe/layerNN/load/expertE`), are folded into the lists the trainer writes now
(`moe/layerNN/load` = [E values]).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from aoe_ep.log_keys import LAYER_PREFIX, layer_key, parse_layer_key


class ReportError(Exception):
    """A run directory that cannot be reported on (missing, no log, no records): one line, exit 2."""


_OLD_PER_ITEM = re.compile(rf"^({LAYER_PREFIX}\d+/(?:load|score_mean|device_load))/(?:expert|device)(\d+)$")


@dataclass
class RunLog:
    """records: step -> {key: float | list}, merged over the records of that step (train window, validation);
    config: the run's config as a dict (None when the run recorded none); run_info: world size and batch layout
    (`run.json`, or a checkpoint's meta.json); source: the file the records came from."""

    path: Path
    records: dict[int, dict[str, Any]]
    config: Optional[dict]
    run_info: dict
    source: str
    skipped_lines: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    def series(self, key: str) -> tuple[list[int], list]:
        """(steps, values) of the records that hold `key`, in step order."""
        steps = [s for s in sorted(self.records) if key in self.records[s]]
        return steps, [self.records[s][key] for s in steps]

    def has(self, key: str) -> bool:
        return any(key in r for r in self.records.values())

    def layers(self) -> list[int]:
        """Indices of the MoE layers the log holds."""
        found = {p[0] for r in self.records.values() for k in r if (p := parse_layer_key(k))}
        return sorted(found)

    def layer_series(self, metric: str) -> dict[int, tuple[list[int], list]]:
        """Per layer that logs `metric` (e.g. 'load', 'ent_load'): (steps, values)."""
        out = {}
        for layer in self.layers():
            steps, values = self.series(layer_key(layer, metric))
            if steps:
                out[layer] = (steps, values)
        return out

    def section(self, name: str) -> dict:
        return (self.config or {}).get(name) or {}

    @property
    def scorer(self) -> Optional[str]:
        return self.section("moe").get("scorer") if self.section("model").get("ffn", "moe") == "moe" else None

    @property
    def ep_size(self) -> int:
        return int(
            self.run_info.get("expert_parallel_size") or self.section("parallel").get("expert_parallel_size") or 1
        )


def read_run(path: str | Path) -> RunLog:
    run = Path(path)
    if not run.is_dir():
        raise ReportError(f"{run}: no such run directory")
    jsonl = run / "log.jsonl"
    if jsonl.is_file():
        records, skipped = _read_jsonl(jsonl)
        source = str(jsonl)
    elif (run / "tb").is_dir():
        records, skipped = _read_tensorboard(run / "tb"), 0
        source = str(run / "tb")
    else:
        raise ReportError(f"{run}: neither log.jsonl nor tb/ found (is this a train.out_dir?)")
    if not records:
        raise ReportError(f"{source}: the log holds no records yet")
    config, run_info = _run_config(run)
    log = RunLog(path=run, records=records, config=config, run_info=run_info, source=source, skipped_lines=skipped)
    if skipped:
        log.notes.append(f"{skipped} unreadable line(s) of {jsonl.name} left out")
    if source.endswith("tb"):
        log.notes.append(
            "read from the tensorboard events (no log.jsonl): per-expert values are not in them, so "
            "the per-expert figures are left out"
        )
    if config is None:
        log.notes.append(
            "no config.yaml in the run directory or its checkpoints: the communication model and the "
            "score labels are left out"
        )
    return log


def _read_jsonl(path: Path) -> tuple[dict[int, dict], int]:
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # the run is writing this line now
    records: dict[int, dict] = {}
    skipped = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            skipped += 1
            print(f"aoe-ep report: {path}:{number}: not a log record, left out", file=sys.stderr)
            continue
        records.setdefault(step, {}).update(_fold_per_item_tags(record))
    return _drop_malformed(records, path), skipped


def _drop_malformed(records: dict[int, dict], path: Path) -> dict[int, dict]:
    """Leave out, with a warning, a record whose value is neither a number nor a list of numbers, or whose list
    (one value per expert or device) has another length than that key's other records."""

    def numeric(x) -> bool:
        return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))

    lengths: dict[str, dict[int, int]] = {}
    for record in records.values():
        for key, value in record.items():
            if isinstance(value, list):
                counts = lengths.setdefault(key, {})
                counts[len(value)] = counts.get(len(value), 0) + 1
    usual = {key: max(counts, key=lambda n: (counts[n], n)) for key, counts in lengths.items()}
    kept = {}
    for step, record in records.items():
        bad = next(
            (
                key
                for key, value in record.items()
                if not (
                    numeric(value)
                    or (isinstance(value, list) and all(map(numeric, value)) and len(value) == usual[key])
                )
            ),
            None,
        )
        if bad is None:
            kept[step] = record
            continue
        value = record[bad]
        what = (
            f"{len(value)} values where the other records have {usual[bad]}"
            if isinstance(value, list) and len(value) != usual[bad]
            else "not a number or a list of numbers"
        )
        print(
            f"aoe-ep report: {path}: the record of step {step} is malformed ({bad}: {what}), left out", file=sys.stderr
        )
    return kept


def _fold_per_item_tags(record: dict) -> dict:
    """`moe/layer00/load/expert3` -> element 3 of `moe/layer00/load` (the earlier log format)."""
    if not any(_OLD_PER_ITEM.match(k) for k in record):
        return record
    out, items = {}, {}
    for key, value in record.items():
        m = _OLD_PER_ITEM.match(key)
        if m:
            items.setdefault(m.group(1), {})[int(m.group(2))] = value
        else:
            out[key] = value
    for key, by_index in items.items():
        out[key] = [by_index.get(i, math.nan) for i in range(max(by_index) + 1)]
    return out


def _read_tensorboard(tb_dir: Path) -> dict[int, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records: dict[int, dict] = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                records.setdefault(int(event.step), {})[tag] = float(event.value)
    return {step: _fold_per_item_tags(r) for step, r in records.items()}


def _run_config(run: Path) -> tuple[Optional[dict], dict]:
    """The config the trainer wrote at start (`config.yaml`), else the newest checkpoint's; the layout from
    `run.json`, else from that checkpoint's meta.json."""
    checkpoints = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
    config_files = [run / "config.yaml"] + [c / "config.yaml" for c in reversed(checkpoints)]
    config = next((yaml.safe_load(p.read_text()) for p in config_files if p.is_file()), None)
    info_files = [run / "run.json"] + [c / "meta.json" for c in reversed(checkpoints)]
    run_info = next((json.loads(p.read_text()) for p in info_files if p.is_file()), {})
    return config, run_info
