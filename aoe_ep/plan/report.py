"""`aoe-ep plan`: the layouts to plan, and the table (or JSON list) that shows them."""

from __future__ import annotations

import json
from typing import Optional

from aoe_ep.config import Config
from aoe_ep.hardware import GPUS, assumptions
from aoe_ep.plan.layout import Plan, plan_layout
from aoe_ep.plan.state import model_parameters

DEFAULT_EP = (1, 2, 4, 8)
DEFAULT_DP = (1, 4, 16)
GIB = 2 ** 30


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


def plan_all(cfg: Config, ep: Optional[int] = None, dp: Optional[int] = None, micro_batch: Optional[int] = None,
             gpu: str = "h100", hot_share: Optional[float] = None) -> list[Plan]:
    params = model_parameters(cfg)
    return [plan_layout(cfg, e, d, micro_batch, gpu, hot_share, params) for e, d in layouts(cfg, ep, dp)]


def _gib(x: float) -> str:
    return f"{x / GIB:,.1f}"


def table(plans: list[Plan]) -> str:
    """One row per layout: state and activation GiB, step FLOPs and bytes sent, step seconds by part, fit."""
    head = ("EP", "DP", "mbs", "dense M", "expert M", "weights", "grads", "adam", "activ.", "total GiB", "TFLOP",
            "EP GB", "DP GB", "compute", "memory", "intra", "inter", "step s", "fits", "max mbs")
    rows = []
    for p in plans:
        ep_bytes = sum(v for k, v in p.comm_bytes_per_step.items() if k.startswith("ep."))
        dp_bytes = sum(v for k, v in p.comm_bytes_per_step.items() if k.startswith("dp."))
        s = p.step_seconds
        rows.append((str(p.ep), str(p.dp), str(p.micro_batch), f"{p.params_dense / 1e6:,.0f}",
                     f"{p.params_expert / 1e6:,.0f}", _gib(p.bytes_weights), _gib(p.bytes_grads),
                     _gib(p.bytes_optimizer), _gib(p.bytes_activations + p.bytes_transient), _gib(p.bytes_total),
                     f"{p.flops_per_step / 1e12:,.0f}", f"{ep_bytes / 1e9:,.1f}", f"{dp_bytes / 1e9:,.1f}",
                     f"{s['compute']:.2f}", f"{s['memory']:.2f}", f"{s['intra_node']:.2f}", f"{s['inter_node']:.2f}",
                     f"{s['total']:.2f}", "yes" if p.fits else "no", str(p.max_micro_batch)))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    return "\n".join(lines)


def render(name: str, cfg: Config, plans: list[Plan], as_json: bool) -> str:
    if as_json:
        return json.dumps([p.as_dict() for p in plans], indent=1)
    first = plans[0]
    kind = f"{cfg.moe.scorer} MoE, {cfg.moe.num_experts} experts top-{cfg.moe.top_k}, dispatcher " \
           f"{cfg.moe.dispatcher}" if cfg.model.ffn == "moe" else "dense"
    skew = (f"one hot expert takes {first.hot_expert_share:.0%} of the routed rows (the rank shown holds it)"
            if first.hot_expert_share is not None else "uniform routing")
    usable = first.bytes_usable
    return "\n".join([
        f"aoe-ep plan {name}: {kind}; {cfg.model.n_layers} layers, d={cfg.model.d_model}; "
        f"{cfg.train.global_batch_tokens:,} tokens per step of {cfg.data.seq_len}-token sequences; "
        f"{first.precision}; dense weights: {cfg.train.dense_parallel}; {skew}",
        f"per rank and step; memory in GiB (activ. = saved activations of one micro-batch + the logits' transient), "
        f"fits = total <= {_gib(usable)} GiB usable on the {GPUS[first.gpu].name}; max mbs = the largest "
        f"micro-batch that fits and divides the per-rank batch",
        table(plans),
        assumptions(GPUS[first.gpu]),
    ])
