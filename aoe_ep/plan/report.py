"""`aoe-ep plan`: the layouts to plan, and the table (or JSON list) that shows them."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from aoe_ep.config import AC_MODES, Config, ConfigError
from aoe_ep.hardware import GPUS, assumptions
from aoe_ep.plan.layout import Plan, plan_layout
from aoe_ep.plan.state import model_parameters

DEFAULT_EP = (1, 2, 4, 8)
DEFAULT_DP = (1, 4, 16)
GIB = 2**30


def layouts(cfg: Config, ep: Optional[int], dp: Optional[int]) -> list[tuple[int, int]]:
    """(ep, dp) pairs: the given ones, or EP 1, 2, 4, 8 (up to and dividing num_experts) × a few DP sizes."""
    if ep is not None:
        eps = [ep]
    elif cfg.model.ffn != "moe":
        eps = [1]
    else:
        eps = [e for e in DEFAULT_EP if e <= cfg.moe.num_experts and cfg.moe.num_experts % e == 0]
    dps = [dp] if dp is not None else list(DEFAULT_DP)
    return [(e, d) for e in eps for d in dps]


def with_ac(cfg: Config, mode: str) -> Config:
    """`cfg` with train.activation_checkpointing = mode."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=mode))


def choose_levers(
    cfg: Config, ep: int, dp: int, gpu: str = "h100", hot_share: Optional[float] = None, params=None
) -> Plan:
    """The activation-checkpointing mode and micro-batch to run: for each mode its largest micro-batch that fits,
    and of those the plan with the shortest step (the earlier mode on a tie: none, selective, full). When no mode
    fits even one sequence, the plan of `full` at one sequence (which says it does not fit)."""
    best = None
    for mode in AC_MODES:
        largest = plan_layout(with_ac(cfg, mode), ep, dp, 1, gpu, hot_share, params).max_micro_batch
        if largest == 0:
            continue
        plan = plan_layout(with_ac(cfg, mode), ep, dp, largest, gpu, hot_share, params)
        if best is None or plan.step_seconds["total"] < best.step_seconds["total"]:
            best = plan
    return best if best is not None else plan_layout(with_ac(cfg, "full"), ep, dp, 1, gpu, hot_share, params)


def plan_all(
    cfg: Config,
    ep: Optional[int] = None,
    dp: Optional[int] = None,
    micro_batch: Optional[int] = None,
    gpu: str = "h100",
    hot_share: Optional[float] = None,
    ac: Optional[str] = None,
) -> list[Plan]:
    """Plans of `layouts`; `ac`: an activation-checkpointing mode (default: the config's), or "auto" for each
    layout's `choose_levers` (which picks the micro-batch too, so it takes no `micro_batch`)."""
    if ac is not None and ac != "auto" and ac not in AC_MODES:
        raise ConfigError(f"--ac: {ac!r} is not one of {', '.join(AC_MODES + ('auto',))}")
    if ac == "auto" and micro_batch is not None:
        raise ConfigError("--ac auto chooses the micro-batch: drop --micro-batch")
    params = model_parameters(cfg)
    if ac == "auto":
        return [choose_levers(cfg, e, d, gpu, hot_share, params) for e, d in layouts(cfg, ep, dp)]
    if ac is not None:
        cfg = with_ac(cfg, ac)
    return [plan_layout(cfg, e, d, micro_batch, gpu, hot_share, params) for e, d in layouts(cfg, ep, dp)]


def _gib(x: float) -> str:
    return f"{x / GIB:,.1f}"


def table(plans: list[Plan]) -> str:
    """One row per layout (AC: the activation-checkpointing mode, /N when every N-th block): state and activation
    GiB, step FLOPs and bytes sent, step seconds by part, fit."""
    head = (
        "EP",
        "DP",
        "AC",
        "mbs",
        "dense M",
        "expert M",
        "weights",
        "grads",
        "adam",
        "activ.",
        "total GiB",
        "TFLOP",
        "EP GB",
        "DP GB",
        "compute",
        "memory",
        "intra",
        "inter",
        "step s",
        "fits",
        "max mbs",
    )
    rows = []
    for p in plans:
        ep_bytes = sum(v for k, v in p.comm_bytes_per_step.items() if k.startswith("ep."))
        dp_bytes = sum(v for k, v in p.comm_bytes_per_step.items() if k.startswith("dp."))
        s = p.step_seconds
        ac = p.activation_checkpointing + (
            f"/{p.ac_every}" if p.ac_every > 1 and p.activation_checkpointing != "none" else ""
        )
        rows.append(
            (
                str(p.ep),
                str(p.dp),
                ac,
                str(p.micro_batch),
                f"{p.params_dense / 1e6:,.0f}",
                f"{p.params_expert / 1e6:,.0f}",
                _gib(p.bytes_weights),
                _gib(p.bytes_grads),
                _gib(p.bytes_optimizer),
                _gib(p.bytes_activations + p.bytes_transient),
                _gib(p.bytes_total),
                f"{p.flops_per_step / 1e12:,.0f}",
                f"{ep_bytes / 1e9:,.1f}",
                f"{dp_bytes / 1e9:,.1f}",
                f"{s['compute']:.2f}",
                f"{s['memory']:.2f}",
                f"{s['intra_node']:.2f}",
                f"{s['inter_node']:.2f}",
                f"{s['total']:.2f}",
                "yes" if p.fits else "no",
                str(p.max_micro_batch),
            )
        )
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    return "\n".join(lines)


def render(name: str, cfg: Config, plans: list[Plan], as_json: bool) -> str:
    if as_json:
        return json.dumps([p.as_dict() for p in plans], indent=1)
    first = plans[0]
    kind = (
        f"{cfg.moe.scorer} MoE, {cfg.moe.num_experts} experts top-{cfg.moe.top_k}, dispatcher {cfg.moe.dispatcher}"
        if cfg.model.ffn == "moe"
        else "dense"
    )
    skew = (
        f"one hot expert takes {first.hot_expert_share:.0%} of the routed rows (the rank shown holds it)"
        if first.hot_expert_share is not None
        else "uniform routing"
    )
    usable = first.bytes_usable
    return "\n".join(
        [
            f"aoe-ep plan {name}: {kind}; {cfg.model.n_layers} layers, d={cfg.model.d_model}; "
            f"{cfg.train.global_batch_tokens:,} tokens per step of {cfg.data.seq_len}-token sequences; "
            f"{first.precision}; dense weights: {cfg.train.dense_parallel}; {skew}",
            "per rank and step; memory in GiB (activ. = saved activations of one micro-batch + the logits' "
            "transient), "
            f"fits = total <= {_gib(usable)} GiB usable on the {GPUS[first.gpu].name}; max mbs = the largest "
            f"micro-batch that fits and divides the per-rank batch",
            table(plans),
            assumptions(GPUS[first.gpu]),
        ]
    )
