"""The paper's optimiser: AdamW (0.9, 0.95) with decoupled weight decay on matrices only, and megatron-core's
schedule: linear warm-up, cosine decay to min_lr, then min_lr, checked against the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aoe_ep.config import TrainConfig
from aoe_ep.train.optim import build_optimizer, build_scheduler, param_groups


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.norm = nn.Parameter(torch.randn(4))
        self.expert = nn.Parameter(torch.randn(2, 3, 4))
        self.expert.expert_parallel = True


def _expected_lr(k: int, cfg: TrainConfig, decay_steps: int) -> float:
    if k <= cfg.warmup_steps:
        return cfg.lr * k / cfg.warmup_steps
    if k > decay_steps:
        return cfg.min_lr
    ratio = (k - cfg.warmup_steps) / (decay_steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * ratio))


@pytest.mark.parametrize("decay_steps", [None, 60])
def test_warmup_then_cosine_to_min_lr(decay_steps):
    cfg = TrainConfig(max_steps=100, lr=2e-4, min_lr=1.28e-5, warmup_steps=10, lr_decay_steps=decay_steps)
    opt = build_optimizer(_Toy(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    for k in range(1, 101):
        sched.step(1)  # the trainer's order: the rate of update k is set just before it
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(_expected_lr(k, cfg, decay_steps or 100), rel=1e-12, abs=1e-15)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.min_lr)


def test_groups_split_decay_and_expert_parameters():
    model = _Toy()
    groups = param_groups(model)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.w)]["wd_mult"] == 1.0 and not by_param[id(model.w)]["expert_parallel"]
    assert by_param[id(model.norm)]["wd_mult"] == 0.0
    assert by_param[id(model.expert)]["expert_parallel"] and by_param[id(model.expert)]["wd_mult"] == 1.0
    assert len(groups) == 3


def test_one_adamw_step_is_decoupled_decay_plus_normalised_gradient():
    torch.manual_seed(0)
    model = _Toy()
    cfg = TrainConfig(max_steps=10, lr=0.1, min_lr=0.0, warmup_steps=0, weight_decay=0.1)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["fused"]
    sched = build_scheduler(opt, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    sched.step(1)
    lr = opt.param_groups[0]["lr"]
    opt.step()
    for name, p in model.named_parameters():
        wd = 0.0 if name == "norm" else 0.1
        # step 1: bias-corrected m = g, v = g^2, so the update is g / (|g| + eps)
        g = grads[name]
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
