"""`aoe-ep bench dispatch`: for EP = 1, 2, 4 on local gloo processes, each dispatcher's bytes per token (measured
by the byte counters, next to the communication model's expectation) and time per forward+backward step."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from aoe_ep.config import CONFIGS_DIR
from aoe_ep.parallel.spawn import run_distributed

DEFAULT_SPEC = CONFIGS_DIR / "bench" / "dispatch.yaml"
SCORERS = ("aoe", "router")
DISPATCHERS = ("allgather", "alltoall")


def _measure(rank: int, world: int, layer_kwargs: dict, tokens: int, iters: int) -> list[dict]:
    import torch.distributed as dist

    from aoe_ep.config import MoEConfig
    from aoe_ep.moe import MoELayer
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(world)
    rows = []
    for scorer in SCORERS:
        for dispatcher in DISPATCHERS:
            cfg = MoEConfig(scorer=scorer, dispatcher=dispatcher, **layer_kwargs)
            torch.manual_seed(0)
            layer = MoELayer(cfg, ep_group=groups.ep_group)
            x = torch.randn(tokens, cfg.d_model, requires_grad=True)
            g = torch.randn_like(x)

            def step():
                y, info = layer(x)
                ((y * g).sum() + info.aux_loss).backward()
                return info

            step()  # warm-up
            layer.dispatcher.counter.reset()
            dist.barrier()
            start = time.perf_counter()
            expert = combine = 0.0
            for _ in range(iters):
                info = step()
                expert += info.timing.expert_seconds
                combine += info.timing.combine_seconds
            dist.barrier()
            seconds = (time.perf_counter() - start) / iters
            counter = layer.dispatcher.counter
            rows.append({"scorer": scorer, "dispatcher": dispatcher, "ep": world, "seconds": seconds,
                         "expert_seconds": expert / iters, "combine_seconds": combine / iters,
                         "fwd_bytes_per_token": counter.total("fwd") / iters / tokens,
                         "bwd_bytes_per_token": counter.total("bwd") / iters / tokens})
            if world == 1:  # one device: both dispatchers are the local one
                rows.append(dict(rows[-1], dispatcher="alltoall"))
                break
    return rows


def main(spec_path: Optional[str], tokens: Optional[int], iters: int, ep_sizes: Optional[list[int]],
         out: Optional[str]) -> list[dict]:
    from aoe_ep.parallel.comm_model import expected_bytes_per_token

    spec = yaml.safe_load(Path(spec_path or DEFAULT_SPEC).read_text())
    layer_kwargs = spec["layer"]
    tokens = tokens or spec["tokens_per_rank"]
    results = []
    for ep in tqdm(ep_sizes or spec["ep_sizes"], desc="EP sizes", disable=None):
        per_rank = run_distributed(ep, _measure, layer_kwargs, tokens, iters)
        for i, row in enumerate(per_rank[0]):
            same = [r[i] for r in per_rank]
            row = dict(row, seconds=max(r["seconds"] for r in same),
                       expert_spread=max(r["expert_seconds"] for r in same) - min(r["expert_seconds"] for r in same),
                       combine_spread=max(r["combine_seconds"] for r in same) - min(r["combine_seconds"] for r in same),
                       fwd_bytes_per_token=sum(r["fwd_bytes_per_token"] for r in same) / ep,
                       bwd_bytes_per_token=sum(r["bwd_bytes_per_token"] for r in same) / ep)
            row["model_bytes_per_token"] = expected_bytes_per_token(
                row["dispatcher"], layer_kwargs["d_model"], layer_kwargs["d_low"], layer_kwargs["num_experts"],
                layer_kwargs["top_k"], ep, aoe_cache=row["scorer"] == "aoe")["fwd"]
            results.append(row)
    print(format_results(results, layer_kwargs, tokens))
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results


def format_results(results: list[dict], layer: dict, tokens: int) -> str:
    lines = [f"dispatch benchmark: d={layer['d_model']} d_ffn={layer['d_ffn']} d_low={layer['d_low']} "
             f"n={layer['num_experts']} K={layer['top_k']}, {tokens} tokens per rank, forward+backward, gloo",
             f"{'scorer':<8}{'EP':>3} {'dispatcher':<10}{'fwd B/tok':>11}{'model':>9}{'bwd B/tok':>11}"
             f"{'ms/step':>9}{'expert ms':>10}{'combine ms':>11}{'spread ms':>10}"]
    for r in results:
        lines.append(f"{r['scorer']:<8}{r['ep']:>3} {r['dispatcher']:<10}{r['fwd_bytes_per_token']:>11.1f}"
                     f"{r['model_bytes_per_token']:>9.1f}{r['bwd_bytes_per_token']:>11.1f}{r['seconds'] * 1e3:>9.1f}"
                     f"{r['expert_seconds'] * 1e3:>10.1f}{r['combine_seconds'] * 1e3:>11.1f}"
                     f"{r['combine_spread'] * 1e3:>10.1f}")
    lines.append("ratios allgather / alltoall (bytes fwd, time):")
    for scorer in SCORERS:
        for ep in sorted({r["ep"] for r in results if r["ep"] > 1}):
            a = next(r for r in results if r["scorer"] == scorer and r["ep"] == ep and r["dispatcher"] == "allgather")
            b = next(r for r in results if r["scorer"] == scorer and r["ep"] == ep and r["dispatcher"] == "alltoall")
            lines.append(f"  {scorer:<7} EP={ep}: bytes {a['fwd_bytes_per_token'] / b['fwd_bytes_per_token']:.2f}, "
                         f"time {a['seconds'] / b['seconds']:.2f}")
    return "\n".join(lines)
