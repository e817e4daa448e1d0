"""Refuse, before anything is allocated, a model whose parameters, gradients and AdamW state cannot fit in this
machine's memory: the per-rank bytes of the plan's arithmetic (`aoe_ep.plan.state`, from `aoe_ep.train.optim`'s sizes:
fp32 weights and gradients,
two AdamW moments) against the accelerator's memory, or the host's physical memory shared by the ranks of this
node."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from aoe_ep.config import Config, ConfigError, count_parameters, ffn_param_count
from aoe_ep.train.optim import ADAM_MOMENTS, FP32

GIB = 2**30


def host_memory_bytes() -> Optional[int]:
    """Physical memory of this machine (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu":
        return host_memory_bytes()
    return None


def state_bytes(cfg: Config, ep: int, world: int) -> int:
    """Weights + gradients + AdamW state one rank keeps (no activations), at the plan's bytes per
    parameter, counted from the config's arithmetic (`count_parameters`): building even a meta model of an absurd
    width overflows torch's size computation."""
    count = count_parameters(cfg)
    experts = cfg.model.n_layers * ffn_param_count(cfg.model, cfg.moe)[0] if cfg.model.ffn == "moe" else 0
    dense = count.total_untied - experts
    if cfg.train.dense_parallel == "fsdp":
        dense = math.ceil(dense / world)
        experts = math.ceil(experts / world)
    else:
        experts = math.ceil(experts / ep)
    return (dense + experts) * FP32 * (2 + ADAM_MOMENTS)


def check_state_fits(cfg: Config, ep: int, world: int, device: torch.device, ranks_sharing: int = 1) -> None:
    """ConfigError naming the sizes when `ranks_sharing` ranks' state exceeds the memory of `device`."""
    available = device_memory_bytes(device)
    if available is None:
        return
    need = state_bytes(cfg, ep, world) * (ranks_sharing if device.type == "cpu" else 1)
    if need > available:
        who = f"{ranks_sharing} rank(s) on this host" if device.type == "cpu" else "each rank"
        raise ConfigError(
            f"model: the parameters, gradients and AdamW state need {need / GIB:,.1f} GiB for {who} "
            f"(EP {ep}, world {world}), more than the {available / GIB:,.1f} GiB of {device.type} "
            f"memory here; reduce model.d_model, model.n_layers or moe.num_experts, or use more ranks"
        )
