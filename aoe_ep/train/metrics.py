"""What the trainer reports: MoE load statistics per layer, tensorboard scalars, histograms and a load heatmap, a
JSON-lines log, a progress bar.

Statistics are values (each layer's `LoadStats` per micro-batch), summed here over the steps between two logs and
over the ranks, then rebuilt with `LoadStats.from_counts` so that every figure (load, Ent_load, Ent_conf, max − min,
per-device load, the idle-time metric) is the one of the global batch of those steps.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from aoe_ep.log_keys import layer_prefix
from aoe_ep.moe import LoadStats, MoEInfo, idle_time
from aoe_ep.packing import PackedLayout, pack
from aoe_ep.parallel.runtime import Runtime, all_reduce_


class MoEStatsAccumulator:
    """Per layer: Σ tokens_per_expert, Σ token entropy, Σ score per expert, Σ tokens, Σ score margin and the tokens
    that have one, and this rank's seconds in expert compute and in the combine collective (`MoEInfo.timing`) of the
    micro-batches added with `timed`: the layers synchronise the accelerator for their timing only on those (the
    trainer's logging steps)."""

    def __init__(self) -> None:
        self.sums: Optional[torch.Tensor] = None  # [L, 2E + 4] float64, `packing`: counts, score sums, entropy sum,
        self.packing: Optional[PackedLayout] = None  # tokens, margin sum, margin tokens
        self.seconds: Optional[torch.Tensor] = None  # [L, 2] float64: expert, combine
        self.erc: Optional[torch.Tensor] = None  # [L, 3] float64, `erc_packing`: Σ ERC loss, Σ mean ε, micro-batches
        self.erc_packing: Optional[PackedLayout] = None

    def add(self, infos: list[MoEInfo], timed: bool = True) -> None:
        if not infos:
            return
        stats = [info.stats for info in infos]
        tokens_L = torch.tensor(
            [float(s.num_tokens) for s in stats], dtype=torch.float64, device=stats[0].tokens_per_expert.device
        )
        sums, self.packing = pack(
            {
                "counts": torch.stack([s.tokens_per_expert.double() for s in stats]),
                "score_sum": torch.stack([s.score_mean.double() for s in stats]) * tokens_L[:, None],
                "entropy_sum": torch.stack([s.ent_conf.double() for s in stats]) * tokens_L,
                "tokens": tokens_L,
                "margin_sum": torch.stack([s.score_margin.double() * s.margin_tokens for s in stats]),
                "margin_tokens": torch.stack([s.margin_tokens.double() for s in stats]),
            },
            batch_dims=1,
        )
        self.sums = sums if self.sums is None else self.sums + sums
        if infos[0].erc_loss is not None:
            erc, self.erc_packing = pack(
                {
                    "erc_loss": torch.stack([i.erc_loss.double() for i in infos]),
                    "erc_eps": torch.stack([i.erc_eps.double() for i in infos]),
                    "micro_batches": torch.ones(len(infos), dtype=torch.float64, device=infos[0].erc_loss.device),
                },
                batch_dims=1,
            )
            self.erc = erc if self.erc is None else self.erc + erc
        if timed:
            seconds = torch.tensor(
                [[i.timing.expert_seconds, i.timing.combine_seconds] for i in infos], dtype=torch.float64
            )
            self.seconds = seconds if self.seconds is None else self.seconds + seconds

    def reduce(self, runtime: Runtime) -> tuple[list[LoadStats], Optional[torch.Tensor]]:
        """(global `LoadStats` per layer, [L, 2, 2] seconds: (expert, combine) x (max, min) over ranks); resets.

        `MoEInfo.stats` is already global over the EP group, so the sum runs over the expert-data-parallel group
        (one rank of each EP group); with EP = 1 that group is the whole world."""
        if self.sums is None:
            return [], None
        sums = all_reduce_(self.sums.clone(), group=runtime.groups.expert_dp_group)
        seconds = (self.seconds if self.seconds is not None else torch.zeros(sums.shape[0], 2)).to(runtime.device)
        hi = all_reduce_(seconds.clone(), op=dist.ReduceOp.MAX)
        lo = all_reduce_(seconds.clone(), op=dist.ReduceOp.MIN)
        f = self.packing.unpack(sums.cpu())
        stats = [
            LoadStats.from_counts(
                f["counts"][i].round().long(),
                f["entropy_sum"][i],
                f["score_sum"][i],
                int(f["tokens"][i]),
                f["margin_sum"][i],
                f["margin_tokens"][i].round().long(),
            )
            for i in range(sums.shape[0])
        ]
        self.sums = self.seconds = None
        return stats, torch.stack([hi.cpu(), lo.cpu()], dim=-1)

    def reduce_erc(self, runtime: Runtime) -> Optional[torch.Tensor]:
        """[L, 2]: the mean ERC loss and mean ε per layer over the micro-batches since the last call (the same on
        every rank of an EP group; averaged over the expert-data-parallel group); None without ERC; resets."""
        if self.erc is None:
            return None
        f = self.erc_packing.unpack(all_reduce_(self.erc.clone(), group=runtime.groups.expert_dp_group).cpu())
        self.erc = None
        return torch.stack([f["erc_loss"], f["erc_eps"]], dim=-1) / f["micro_batches"].clamp_min(1.0)[:, None]


def moe_scalars(
    stats: list[LoadStats],
    seconds: Optional[torch.Tensor],
    ep_size: int,
    placements: Optional[list] = None,
    erc: Optional[torch.Tensor] = None,
) -> dict[str, float | list]:
    """The MoE layers' record of one logging window. Floats are summary scalars (per layer Ent_load, Ent_conf,
    max − min per expert and per device; the idle-time sums; seconds); lists hold one value per expert or device
    (`RunLogger` writes them to the JSONL whole and to tensorboard as histograms). `placements`: each layer's
    expert placement (contiguous when absent), which `LoadStats.device_load` maps experts to devices by. `erc`:
    [L, 2] per-layer ERC loss and mean ε (`MoEStatsAccumulator.reduce_erc`), logged as `erc_loss` and `erc_eps`."""
    out: dict[str, float | list] = {}
    placements = placements if placements is not None else [None] * len(stats)
    for i, (s, placement) in enumerate(zip(stats, placements)):
        prefix = layer_prefix(i)
        out[f"{prefix}/ent_load"] = float(s.ent_load)
        out[f"{prefix}/ent_conf"] = float(s.ent_conf)
        out[f"{prefix}/max_minus_min"] = float(s.max_minus_min)
        out[f"{prefix}/load"] = s.load.tolist()
        out[f"{prefix}/score_mean"] = s.score_mean.tolist()
        out[f"{prefix}/tokens_per_expert"] = s.tokens_per_expert.tolist()
        if ep_size > 1:
            device_load = s.device_load(ep_size, placement)
            out[f"{prefix}/device_load"] = device_load.tolist()
            out[f"{prefix}/device_max_minus_min"] = float(device_load.max() - device_load.min())
        if erc is not None:
            out[f"{prefix}/erc_loss"], out[f"{prefix}/erc_eps"] = float(erc[i, 0]), float(erc[i, 1])
    if stats:
        out["moe/idle_time"] = idle_time(stats)
        out["moe/idle_time_device"] = idle_time(stats, num_devices=ep_size, placements=placements)
    if seconds is not None:
        total = seconds.sum(dim=0)  # [2 (expert, combine), 2 (max, min)] summed over layers
        for j, name in enumerate(("expert", "combine")):
            out[f"moe/seconds/{name}_max"] = float(total[j, 0])
            out[f"moe/seconds/{name}_min"] = float(total[j, 1])
        out["moe/seconds/expert_max_minus_min"] = float(total[0, 0] - total[0, 1])
    return out


# Colour scale of the load heatmap image: load × E, so that 1 is the uniform share; clipped at 2.
HEATMAP_MAX_RELATIVE_LOAD = 2.0


def load_heatmap(stats: list[LoadStats]) -> np.ndarray:
    """[H, W, 3] uint8 image of the layer × expert load (rows: layers from the top, columns: experts), coloured by
    load × E on a diverging map (blue 0, grey 1 = balanced, red `HEATMAP_MAX_RELATIVE_LOAD` or more); each cell a
    block of pixels, so that tensorboard
    shows it at a readable size without a plotting library in the training loop."""
    from matplotlib import colormaps

    load_LE = torch.stack([s.load for s in stats]).double()
    relative_LE = (load_LE * load_LE.shape[1] / HEATMAP_MAX_RELATIVE_LOAD).clamp(0.0, 1.0).numpy()
    rgb_LE3 = (colormaps["coolwarm"](relative_LE)[..., :3] * 255).round().astype(np.uint8)
    cell_h = max(4, 96 // load_LE.shape[0])
    cell_w = max(4, 256 // load_LE.shape[1])
    return np.repeat(np.repeat(rgb_LE3, cell_h, axis=0), cell_w, axis=1)


def comm_scalars(moe_layers: list, steps: int) -> dict[str, float]:
    """Bytes this rank sent per step in the MoE layers' collectives since the last call, by collective and
    direction (the dispatchers' counters, which `aoe_ep.parallel.comm_model` predicts); resets the counters."""
    totals: dict[str, int] = {}
    for layer in moe_layers:
        for name, value in layer.dispatcher.counter.as_dict().items():
            totals[name] = totals.get(name, 0) + value
        layer.dispatcher.counter.reset()
    return {f"moe/bytes_per_step/{name}": value / max(steps, 1) for name, value in sorted(totals.items())}


def peak_memory_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak on GPU; the process's peak resident set on CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RunLogger:
    """Rank 0 writes tensorboard events under `<out_dir>/tb` and one JSON object per record to `<out_dir>/log.jsonl`;
    other ranks write nothing. In a record, floats become tensorboard scalars and lists (one value per expert or
    device) histograms; the JSONL keeps every value. `purge_step` (the resumed step) drops events a crashed run
    logged after its last checkpoint. `config_yaml` and `run_info` (world size, batch layout) are written to
    `<out_dir>/config.yaml` and `<out_dir>/run.json` at start, for `aoe-ep report`."""

    def __init__(
        self,
        out_dir: Path,
        enabled: bool,
        purge_step: Optional[int] = None,
        config_yaml: Optional[str] = None,
        run_info: Optional[dict] = None,
    ):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            out_dir.mkdir(parents=True, exist_ok=True)
            if config_yaml is not None:
                (out_dir / "config.yaml").write_text(config_yaml)
            if run_info is not None:
                (out_dir / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
            self.writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=purge_step)
            self.jsonl = open(out_dir / "log.jsonl", "a")

    def log(self, step: int, record: dict[str, float | list], images: Optional[dict[str, np.ndarray]] = None) -> None:
        """`images`: tag -> [H, W, 3] uint8, to tensorboard only."""
        if not self.enabled:
            return
        for tag, value in record.items():
            if isinstance(value, (list, tuple)):
                self.writer.add_histogram(tag, np.asarray(value, dtype=np.float64), step)
            else:
                self.writer.add_scalar(tag, value, step)
        for tag, image_HW3 in (images or {}).items():
            self.writer.add_image(tag, image_HW3, step, dataformats="HWC")
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """Rank 0's bar: steps done, loss and tokens/s as postfix, elapsed and ETA from tqdm."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 15.0,
        desc="train",
    )
