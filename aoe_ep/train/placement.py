"""Load-aware expert placement in the trainer (`parallel.expert_placement`): the load it is chosen from, when it is
applied, and how parameters and optimizer state follow their experts.

The load is the global token count per layer and expert over the applied steps since the last checkpoint
(`ExpertLoad`): their plain sum, and a recency-weighted sum (each step's counts weighted by 0.5 ** (age in steps /
`parallel.placement_half_life`)), which is what the placement is chosen from, since routing keeps moving during
training and the recent load predicts the next steps' load better than the whole interval's (measured on the tiny
run: docs/studies.md). Each checkpoint records both in `meta.json` (`expert_load`) with the placement those steps ran
under
(`expert_placement`). Under `balanced`, a run re-places its experts when it loads a checkpoint (from the load
that checkpoint recorded) and after each save (from the load just recorded); every rank computes the same placement
from the same counts. Re-placing moves each expert's parameters and AdamW moments to its new rank
(`aoe_ep.parallel.reshard.move_experts`, copies only): no result changes but the per-device load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from aoe_ep.moe import MoELayer
from aoe_ep.moe.placement import Placement, balanced_placement
from aoe_ep.parallel.reshard import move_experts
from aoe_ep.parallel.runtime import Runtime, all_reduce_
from aoe_ep.train.optim import is_expert_param

LOAD_KEY, PLACEMENT_KEY = "expert_load", "expert_placement"


class ExpertLoad:
    """Tokens per expert of each MoE layer over the applied steps since the last checkpoint (this EP group's global
    counts; `reduce` sums the EP groups): `counts_LE` the plain sum, `recent_LE` the recency-weighted one
    (half-life `half_life` steps; 0: the plain sum)."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        half_life: float = 0.0,
        device: torch.device = torch.device("cpu"),  # noqa: B008 (an immutable default)
    ) -> None:
        self.shape = (num_layers, num_experts)
        self.decay = 0.5 ** (1.0 / half_life) if half_life > 0 else 1.0
        self.half_life = half_life
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.counts_LE = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        self.recent_LE = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        self.steps = 0

    def add(self, step_LE: torch.Tensor) -> None:
        """One applied step's [L, n] token counts (its micro-batches summed: `moe.balance.step_token_counts`), kept
        on their device, so that a step adds no host synchronisation."""
        self.counts_LE += step_LE
        self.recent_LE = self.recent_LE * self.decay + step_LE
        self.steps += 1

    def reduce(self, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, int]:
        """([L, n] global counts, [L, n] recency-weighted counts, steps) since the last call (collective); resets."""
        both = torch.stack([self.counts_LE, self.recent_LE]).to(runtime.device)
        total = all_reduce_(both, group=runtime.groups.expert_dp_group).cpu()
        steps = self.steps
        self._reset()
        return total[0], total[1], steps


def recorded_load(meta: dict) -> Optional[torch.Tensor]:
    """The [L, n] load a checkpoint's meta.json recorded (the recency-weighted counts, else the plain sum), or None
    (no steps, or an older checkpoint)."""
    entry = meta.get(LOAD_KEY)
    if not isinstance(entry, dict):
        return None
    values = entry.get("recent_tokens_per_expert") or entry.get("tokens_per_expert")
    if not values:
        return None
    counts = torch.tensor(values, dtype=torch.float64)
    return counts if counts.ndim == 2 and float(counts.sum()) > 0 else None


def load_meta(counts_LE: torch.Tensor, recent_LE: torch.Tensor, steps: int, since_step: int, half_life: float) -> dict:
    return {
        LOAD_KEY: {
            "since_step": since_step,
            "steps": steps,
            "half_life_steps": half_life,
            "tokens_per_expert": [[int(round(v)) for v in row] for row in counts_LE.tolist()],
            "recent_tokens_per_expert": [[round(v, 4) for v in row] for row in recent_LE.tolist()],
        }
    }


def placement_meta(mode: str, layers: Sequence[MoELayer]) -> dict:
    return {PLACEMENT_KEY: {"mode": mode, "layers": [layer.placement.as_lists() for layer in layers]}}


def choose(counts_LE: torch.Tensor, num_devices: int) -> list[Placement]:
    """The balanced placement of each layer."""
    return [balanced_placement(row, num_devices) for row in counts_LE]


@torch.no_grad()
def apply_placements(
    layers: Sequence[MoELayer],
    placements: Sequence[Placement],
    optimizer: Optional[torch.optim.Optimizer],
    runtime: Runtime,
) -> int:
    """Move each layer's expert parameters and their optimizer state to `placements` (collective over the EP
    group), then route by them. Returns how many layers changed."""
    changed = 0
    for layer, new in zip(layers, placements):
        old = layer.placement
        if new == old:
            continue
        for p in layer.parameters():
            if not is_expert_param(p):
                continue
            _move_in_place(p, old, new, runtime)
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == p.shape[0]:
                    _move_in_place(value, old, new, runtime)
        layer.set_placement(new)
        changed += 1
    return changed


def _move_in_place(t: torch.Tensor, old: Placement, new: Placement, runtime: Runtime) -> None:
    moved = move_experts(t, old, new, runtime.groups.ep_group)
    local = t.to_local() if hasattr(t, "to_local") else t.data
    local.copy_(moved)


def describe(layers: Sequence[MoELayer], placements: Sequence[Placement], counts_LE: torch.Tensor) -> list[str]:
    """One line per layer: the experts per rank and the per-device max − min of the load, before and after."""
    lines = []
    for i, (layer, new) in enumerate(zip(layers, placements)):
        load = counts_LE[i] / counts_LE[i].sum().clamp_min(1)
        lines.append(
            f"  layer {i:02d}: {new.as_lists()} per-device max-min load {layer.placement.spread(load):.4f} "
            f"-> {new.spread(load):.4f}"
        )
    return lines
