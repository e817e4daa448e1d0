"""AoE upcycled from a routed MoE (`aoe-ep import --to aoe --d-low R`).

Each expert's gate projection W_g [d, d_ffn] is factorised by truncated SVD, W_g ≈ U_R Σ_R V_Rᵀ, into
W_down = U_R Σ_R^½ [d, R] and W_up = Σ_R^½ V_Rᵀ [R, d_ffn] (the singular values split evenly between the two), the
router is dropped, and the experts select themselves by ‖x W_down‖: the AoE paper's Section 3.1 observation (a
pretrained Mixtral's experts, ranked by the norm of their own activations, choose nearly as well as its router),
made trainable. W_p and W_o are kept; d_wide = d_ffn, so the expert computes (SiLU(x W_down W_up) ⊙ x W_p) W_o.

The relative Frobenius error ‖W_g − W_down W_up‖_F / ‖W_g‖_F of every expert is reported per layer. The factors
come from `aoe_ep.model.lowrank.factorise`, which `aoe-ep router-free --d-low R` uses too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from aoe_ep.config import Config, ConfigError
from aoe_ep.hf.errors import ConversionError
from aoe_ep.model.lowrank import factorise


@dataclass(frozen=True)
class UpcycleReport:
    """d_low: the rank R; errors_LE: the relative Frobenius error of each layer's experts [layers][experts];
    energy_LE: the share of ‖W_g‖_F² the kept singular values hold."""

    d_low: int
    errors_LE: list[list[float]]
    energy_LE: list[list[float]]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def upcycle(cfg: Config, state: dict[str, torch.Tensor], d_low: int) -> tuple[Config, dict, UpcycleReport]:
    """The AoE config and state dict of a routed MoE with SwiGLU experts (aoe-ep names), and the report."""
    m = cfg.moe
    if m is None or m.scorer != "router" or m.factorized:
        raise ConversionError("--to aoe needs a routed MoE with SwiGLU experts (a Mixtral directory)")
    if not 0 < d_low <= min(cfg.model.d_model, m.d_ffn):
        raise ConversionError(f"--d-low {d_low}: must lie in [1, min(d_model={cfg.model.d_model}, d_ffn={m.d_ffn})]")
    try:
        moe = dataclasses.replace(m, scorer="aoe", d_low=d_low, d_wide=m.d_ffn, expert_kind="auto")
    except ConfigError as err:
        raise ConversionError(str(err)) from None
    out = dict(state)
    errors, energies = [], []
    for i in range(cfg.model.n_layers):
        prefix = f"blocks.{i}.ffn."
        del out[prefix + "scorer.weight"]
        w_gate_EDF = out.pop(prefix + "experts.w_gate")
        parts = [factorise(w, d_low) for w in w_gate_EDF]
        out[prefix + "scorer.w_down"] = torch.stack([p[0] for p in parts]).contiguous()
        out[prefix + "experts.w_up"] = torch.stack([p[1] for p in parts]).contiguous()
        errors.append([p[2] for p in parts])
        energies.append([p[3] for p in parts])
    new_cfg = dataclasses.replace(cfg, moe=moe).validate()
    return new_cfg, out, UpcycleReport(d_low=d_low, errors_LE=errors, energy_LE=energies)


def describe(report: UpcycleReport) -> str:
    lines = [
        (
            f"AoE upcycling at d_low = {report.d_low}: relative Frobenius error of W_g ≈ W_down·W_up per layer "
            f"(mean over experts, max), share of ‖W_g‖² kept"
        )
    ]
    for i, (errors, energy) in enumerate(zip(report.errors_LE, report.energy_LE)):
        lines.append(
            f"  layer {i:2d}: error {sum(errors) / len(errors):.4f} (max {max(errors):.4f}), "
            f"energy kept {sum(energy) / len(energy):.4f}"
        )
    return "\n".join(lines)


def upcycle_import(hf_dir: str | Path, out_dir: str | Path, d_low: int | None, tokenizer: str | None = None):
    """`aoe-ep import --to aoe --d-low R`: (ImportResult, UpcycleReport)."""
    from aoe_ep.hf.importer import import_hf

    if d_low is None:
        raise ConversionError("--to aoe needs --d-low R, the rank of the factorised gate projections")
    reports = []

    def transform(cfg, state):
        new_cfg, new_state, report = upcycle(cfg, state, d_low)
        reports.append(report)
        return new_cfg, new_state

    result = import_hf(hf_dir, out_dir, tokenizer=tokenizer, transform=transform)
    return result, reports[0]
