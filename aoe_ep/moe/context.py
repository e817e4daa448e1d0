"""What the caller tells the MoE layers for one forward: the step context.

The trainer builds one `StepContext` per step and passes it down `Decoder.forward` → block → `MoELayer.forward`;
a layer keeps no per-step settings of its own. `DEFAULT_CONTEXT` is what a plain `layer(x)` or `model(tokens)` runs
with: step 0, no timing synchronisation, no recorded selection, non-finite input refused, and the aux loss in the
form whose gradients, summed over the expert-parallel group, are the single-device gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

INPUT_CHECKS = ("raise", "flag")


@dataclass(frozen=True)
class StepContext:
    """step, seed: the training step and the run seed (with the layer's index they seed the ERC noise, so that it is
    the same on every rank and after a resume); synchronize_timing: the layers wait for the accelerator around their
    timed phases (costs throughput: the trainer sets it on logging steps only); record_selection: `MoEInfo.mask_TE`
    carries the selection of this rank's tokens; input_check: "raise" refuses NaN or infinite input, "flag" lets it
    through and counts it in `MoEInfo.nonfinite_inputs`; rank_mean_gradients: the caller averages every rank's
    gradients over the data-parallel world (DDP's mean) instead of summing the expert-parallel group's, so the layer
    scales its aux loss's gradient by the EP size (its value is unchanged)."""

    step: int = 0
    seed: int = 0
    synchronize_timing: bool = False
    record_selection: bool = False
    input_check: str = "raise"
    rank_mean_gradients: bool = False

    def __post_init__(self) -> None:
        if self.input_check not in INPUT_CHECKS:
            raise ValueError(f"StepContext.input_check must be one of {INPUT_CHECKS}, got {self.input_check!r}")


DEFAULT_CONTEXT = StepContext()
