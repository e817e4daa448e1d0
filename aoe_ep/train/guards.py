"""The non-finite step guard: a step whose loss or gradient norm is NaN or infinite on any rank is skipped by every
rank together, and a run of `train.max_bad_steps` such steps stops with one error naming the step and the MoE layers
whose inputs or statistics went bad.

Every rank must reach the same verdict at the same point, or the ranks that carry on wait in a collective for the
ones that stopped. The verdict is therefore read from the world-wide all-reduce of the step's losses, which the step
does anyway: next to the two loss sums it carries whether this rank's gradient norm was finite and, per MoE layer,
the count of non-finite inputs the layer saw (`MoEInfo.nonfinite_inputs`, the MoE layers run in "flag" mode) and
whether its statistics (scores, confidence entropy) came out non-finite. A NaN or infinity on any rank makes the
reduced loss sum non-finite or a flag non-zero on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from aoe_ep.moe import MoEInfo
from aoe_ep.packing import PackedLayout, pack


class TrainingError(RuntimeError):
    """The run cannot go on (every rank raises it at the same step)."""


class StepHealth:
    """Per-layer flags of one step, accumulated on the device over its micro-batches (no host synchronisation)."""

    def __init__(self, num_layers: int, device: torch.device):
        self.nonfinite_inputs_L = torch.zeros(num_layers, device=device, dtype=torch.float64)
        self.bad_stats_L = torch.zeros(num_layers, device=device, dtype=torch.float64)

    def add(self, infos: Sequence[MoEInfo]) -> None:
        if not infos:
            return
        # an int under expert parallelism (it came with the dispatcher's sizes), else a 0-dim device tensor
        self.nonfinite_inputs_L += torch.stack(
            [torch.as_tensor(info.nonfinite_inputs).to(self.nonfinite_inputs_L) for info in infos]
        )
        self.bad_stats_L += torch.stack(
            [
                (~torch.isfinite(info.stats.score_mean).all() | ~torch.isfinite(info.stats.ent_conf)).to(
                    self.bad_stats_L
                )
                for info in infos
            ]
        )

    def packed(self, losses: torch.Tensor, grad_norm: float) -> torch.Tensor:
        """[lm, aux, gradient norm not finite, nonfinite inputs per layer (L), bad statistics per layer (L)]
        (`health_packing`): what the step all-reduces over the world."""
        packed, _ = pack(
            {
                "loss": losses[0],
                "aux_loss": losses[1],
                "grad_norm_bad": losses.new_tensor(0.0 if math.isfinite(grad_norm) else 1.0),
                "nonfinite_inputs": self.nonfinite_inputs_L,
                "bad_stats": self.bad_stats_L,
            }
        )
        return packed


def health_packing(num_layers: int) -> PackedLayout:
    """The layout of `StepHealth.packed` for a model of `num_layers` MoE layers."""
    return PackedLayout(
        ("loss", "aux_loss", "grad_norm_bad", "nonfinite_inputs", "bad_stats"),
        (None, None, None, num_layers, num_layers),
    )


@dataclass(frozen=True)
class Verdict:
    """The reduced step: loss and aux loss (means over ranks), and what went bad. `good`: apply the update."""

    loss: float
    aux_loss: float
    grad_norm_bad: bool
    nonfinite_inputs: tuple[int, ...]  # per MoE layer, counted once per EP group
    bad_stats: tuple[bool, ...]  # per MoE layer, on any rank

    @property
    def good(self) -> bool:
        return (
            math.isfinite(self.loss)
            and math.isfinite(self.aux_loss)
            and not self.grad_norm_bad
            and not any(self.nonfinite_inputs)
            and not any(self.bad_stats)
        )

    def bad_layers(self) -> list[str]:
        return [
            f"layer {i}" + (f" ({n} non-finite input value(s))" if n else " (non-finite statistics)")
            for i, (n, stats) in enumerate(zip(self.nonfinite_inputs, self.bad_stats))
            if n or stats
        ]


def verdict(reduced: torch.Tensor, world_size: int, ep_size: int) -> Verdict:
    """Read the all-reduced `StepHealth.packed` tensor (summed over `world_size` ranks)."""
    num_layers = (reduced.numel() - 3) // 2  # three scalars, then two values per layer
    f = {k: v.tolist() for k, v in health_packing(num_layers).unpack(reduced.cpu()).items()}
    # each EP rank reports its group's count: the world sum holds every group's count ep_size times
    return Verdict(
        loss=f["loss"] / world_size,
        aux_loss=f["aux_loss"] / world_size,
        grad_norm_bad=f["grad_norm_bad"] > 0,
        nonfinite_inputs=tuple(int(round(n / ep_size)) for n in f["nonfinite_inputs"]),
        bad_stats=tuple(s > 0 for s in f["bad_stats"]),
    )


class BadStepCounter:
    """Counts skipped steps (all of them, and in a row) and raises `TrainingError` at `max_bad_steps` in a row."""

    def __init__(self, max_bad_steps: int, skipped: int = 0):
        self.max_bad_steps = max_bad_steps
        self.skipped = skipped
        self.in_a_row = 0

    def update(self, v: Verdict) -> None:
        if v.good:
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1

    def raise_if_exhausted(self, step: int, v: Verdict, grad_norm: float, last_good: Optional[str]) -> None:
        """After `update`: raise when `step` is the `max_bad_steps`-th bad one in a row."""
        if self.in_a_row < self.max_bad_steps:
            return
        layers = v.bad_layers()
        where = (
            ("in MoE " + ", ".join(layers))
            if layers
            else "in no MoE layer's inputs or statistics (the loss or gradients went bad elsewhere)"
        )
        raise TrainingError(
            f"step {step}: {self.in_a_row} steps in a row with a non-finite loss or gradient norm "
            f"(train.max_bad_steps={self.max_bad_steps}; last: loss {v.loss}, gradient norm {grad_norm}); "
            f"non-finite values {where}; "
            + (f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet")
        )

    def describe(self, step: int, v: Verdict, grad_norm: float) -> str:
        layers = v.bad_layers()
        return (
            f"step {step}: loss {v.loss:.4g}, gradient norm {grad_norm:.4g}"
            + (f", non-finite in MoE {', '.join(layers)}" if layers else "")
            + f"; update skipped on every rank ({self.in_a_row} in a row, {self.skipped} in all)"
        )
