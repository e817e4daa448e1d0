"""The paper's optimiser (Section 4.1): AdamW (β = 0.9, 0.95), weight decay 0.1, then linear warm-up and cosine
decay to a minimum learning rate through megatron-core's `OptimizerParamScheduler`.

apex's FusedAdam on GPU when apex is installed (NGC images carry it), torch's fused AdamW otherwise (CPU included).
"""

from __future__ import annotations

import aoe_ep.megatron_core  # noqa: F401  (first: megatron-core without its TE / apex start-up warnings)

# isort: split
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import nn

from aoe_ep.config import TrainConfig

FP32 = 4  # bytes of an fp32 master weight, gradient or moment
ADAM_MOMENTS = 2  # AdamW keeps two moments per element


def is_expert_param(p: nn.Parameter) -> bool:
    """Set by MoELayer on parameters sharded over the expert-parallel group."""
    return bool(getattr(p, "expert_parallel", False))


def param_groups(model: nn.Module) -> list[dict]:
    """Matrices decay, vectors (RMSNorm weights) do not (`wd_mult` 0, read by the scheduler). Expert and dense
    parameters go to separate groups: under FSDP2 the dense ones are DTensors, and a fused step cannot mix kinds."""
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((is_expert_param(p), p.ndim >= 2), []).append(p)
    return [
        {"params": params, "wd_mult": 1.0 if decay else 0.0, "expert_parallel": expert}
        for (expert, decay), params in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, allow_apex: bool = True
) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model)`; the learning rate and weight decay are set by the scheduler each step."""
    groups = param_groups(model)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, eps=1e-8)
    if device.type == "cuda" and allow_apex:
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            pass
        else:
            return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> OptimizerParamScheduler:
    """Linear warm-up from 0 over `warmup_steps`, then `lr_decay_style` down to `min_lr` at `lr_decay_steps`
    (default: max_steps). The trainer calls `step(1)` before each update, so update k uses the rate of step k."""
    decay_steps = cfg.max_steps if cfg.lr_decay_steps is None else cfg.lr_decay_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
