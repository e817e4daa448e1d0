"""The communication model (`aoe_ep/parallel/comm_model.py`) evaluated for a logged run: the bytes rank 0 should
send per step in each MoE collective, to set beside the dispatchers' counters the trainer logged.

Per step rank 0 runs `num_micro_batches` forwards and backwards of every MoE layer on micro_batch_size × seq_len
tokens. Two routings feed the model's pair counts: uniform top-K (`aoe_ep.plan.routing`), and, for alltoall, the
logged per-device load (W[r][q] = T_r·K·device_load[q], averaged over the logged windows per layer). The
allgather's A counts (tokens with at least one winner on a rank) do not follow from the load alone, so it gets
the uniform model only.
"""

from __future__ import annotations

import numpy as np

from aoe_ep.config import ConfigError, config_from_dict
from aoe_ep.parallel.comm_model import bytes_from_pairs
from aoe_ep.plan.activations import routed_rows
from aoe_ep.plan.layout import ep_layer_bytes
from aoe_ep.plan.routing import routing_model
from aoe_ep.train.batches import plan_batches
from aoe_ep.train.run_log import RunLog


def _element_bytes(run: RunLog, cfg) -> int:
    precision = str(run.run_info.get("precision", ""))
    if precision:
        return 2 if "bfloat16" in precision else 4
    return 2 if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cfg.train.device == "cuda") else 4


def expected_bytes_per_step(run: RunLog) -> dict[str, dict[str, float]]:
    """{model label: {collective name as logged (e.g. 'dispatch/fwd'): bytes per step}}; empty without a config,
    at EP = 1, or for a dense model."""
    if run.config is None or run.ep_size < 2 or run.scorer is None:
        return {}
    try:
        cfg = config_from_dict(run.config)
    except ConfigError:
        return {}
    ep, moe = run.ep_size, cfg.moe
    world = int(run.run_info.get("world_size") or ep)
    if "num_micro_batches" in run.run_info:
        micro_batches = int(run.run_info["num_micro_batches"])
        tokens = int(run.run_info["micro_batch_size"]) * int(run.run_info["seq_len"])
    else:
        plan = plan_batches(cfg, world, 0)
        micro_batches, tokens = plan.num_micro_batches, plan.micro_batch_size * plan.seq_len
    elem = _element_bytes(run, cfg)
    rows_per_token = routed_rows(moe, ep * tokens) / (ep * tokens)
    layers = cfg.model.n_layers
    uniform_routing = routing_model(moe.num_experts, rows_per_token, None)
    uniform = ep_layer_bytes(moe, ep, tokens, elem, uniform_routing)
    out = {"model, uniform routing": {k: v * layers * micro_batches for k, v in uniform.items()}}
    device_loads = run.layer_series("device_load")
    if moe.dispatcher == "alltoall" and device_loads:
        total: dict[str, float] = {}
        for _steps, values in device_loads.values():
            load_q = np.mean(np.asarray(values, dtype=float), axis=0)
            pairs = [[tokens * rows_per_token * float(x) for x in load_q] for _ in range(ep)]
            layer = bytes_from_pairs(
                "alltoall",
                pairs,
                [tokens] * ep,
                0,
                moe.num_experts,
                moe.d_model,
                moe.d_low,
                elem,
                aoe_cache=moe.scorer == "aoe",
                expert_choice=moe.selection == "expert_choice",
                rank_pairs=uniform_routing.rank_pairs(tokens, ep),
            )  # rows: not logged
            for k, v in layer.items():
                total[k] = total.get(k, 0.0) + v * micro_batches
        out["model, logged device load"] = total
    return out
