"""`aoe-ep bench dispatch`: per case of the spec (a layer, tokens per rank, EP sizes) and EP size on local gloo
processes, each contender's bytes per token (measured by the byte counters, next to the communication model's
expectation) and time per forward+backward step. The contenders are `allgather` and `alltoall` on its two routes:
"rank" (the default: a token once per (token, rank), combined there) and "pair" (one row per (token, expert)).

Times are taken in interleaved rounds (every contender `iters` steps per round, in turn), and the ratios between
contenders are medians of the per-round ratios: on a shared machine the noise is larger than the differences.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from aoe_ep.config import CONFIGS_DIR, resolve_config_path
from aoe_ep.parallel.spawn import run_distributed

DEFAULT_SPEC = CONFIGS_DIR / "bench" / "dispatch.yaml"
SCORERS = ("aoe", "router")
CONTENDERS = (("allgather", None), ("alltoall", "rank"), ("alltoall", "pair"))  # (dispatcher, alltoall route)


def _measure(rank: int, world: int, layer_kwargs: dict, tokens: int, iters: int, rounds: int) -> list[dict]:
    import torch.distributed as dist

    from aoe_ep.config import MoEConfig
    from aoe_ep.moe import MoELayer
    from aoe_ep.parallel.alltoall import AllToAllDispatcher
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(world)
    contenders = CONTENDERS if world > 1 else CONTENDERS[:1]  # one device: every contender is the local layer
    rows = []
    for scorer in SCORERS:
        steps = []
        for dispatcher, route in contenders:
            cfg = MoEConfig(scorer=scorer, dispatcher=dispatcher, **layer_kwargs)
            torch.manual_seed(0)
            handed = AllToAllDispatcher(groups.ep_group, cfg.num_experts, combine=route) if route else None
            layer = MoELayer(cfg, ep_group=groups.ep_group, dispatcher=handed)
            x = torch.randn(tokens, cfg.d_model, requires_grad=True)
            g = torch.randn_like(x)

            def step(layer=layer, x=x, g=g):
                y, info = layer(x)
                ((y * g).sum() + info.aux_loss).backward()
                return info

            step()  # warm-up
            layer.dispatcher.counter.reset()
            steps.append((layer, step))
        seconds = [[] for _ in contenders]
        expert = [0.0] * len(contenders)
        combine = [0.0] * len(contenders)
        for _ in range(rounds):
            for i, (_layer, step) in enumerate(steps):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(iters):
                    info = step()
                    expert[i] += info.timing.expert_seconds
                    combine[i] += info.timing.combine_seconds
                dist.barrier()
                seconds[i].append((time.perf_counter() - start) / iters)
        for i, ((dispatcher, route), (layer, _)) in enumerate(zip(contenders, steps)):
            counter, n = layer.dispatcher.counter, iters * rounds
            rows.append(
                {
                    "scorer": scorer,
                    "dispatcher": dispatcher,
                    "route": route,
                    "ep": world,
                    "round_seconds": seconds[i],
                    "seconds": statistics.median(seconds[i]),
                    "expert_seconds": expert[i] / n,
                    "combine_seconds": combine[i] / n,
                    "fwd_bytes_per_token": counter.total("fwd") / n / tokens,
                    "bwd_bytes_per_token": counter.total("bwd") / n / tokens,
                }
            )
        if world == 1:
            rows += [dict(rows[-1], dispatcher=d, route=r) for d, r in CONTENDERS[1:]]
    return rows


def _cases(spec: dict) -> dict[str, dict]:
    """The spec's main case (its top-level `layer`, `tokens_per_rank`, `ep_sizes`) and its named `cases`, each of
    the same keys."""
    main_case = {k: spec[k] for k in ("layer", "tokens_per_rank", "ep_sizes")}
    out = {"main": main_case}
    for name, case in (spec.get("cases") or {}).items():
        missing = {"layer", "tokens_per_rank", "ep_sizes"} - set(case)
        if missing:
            raise ValueError(f"bench dispatch spec: case {name!r} lacks {sorted(missing)}")
        out[name] = case
    return out


def main(
    spec_path: Optional[str], tokens: Optional[int], iters: int, ep_sizes: Optional[list[int]], out: Optional[str]
) -> list[dict]:
    """Run every case of the spec (`tokens` and `ep_sizes`, when given, replace each case's own); `rounds` comes
    from the spec (default 1)."""
    from aoe_ep.parallel.comm_model import expected_bytes_per_token

    spec = yaml.safe_load((resolve_config_path(spec_path) if spec_path else DEFAULT_SPEC).read_text())
    rounds = int(spec.get("rounds", 1))
    if rounds < 1 or iters < 1:
        raise ValueError(f"bench dispatch needs rounds >= 1 and iters >= 1, got {rounds} and {iters}")
    results, text = [], []
    for name, case in _cases(spec).items():
        layer_kwargs, case_tokens = case["layer"], tokens or case["tokens_per_rank"]
        case_results = []
        for ep in tqdm(ep_sizes or case["ep_sizes"], desc=f"{name}: EP sizes", disable=None):
            per_rank = run_distributed(ep, _measure, layer_kwargs, case_tokens, iters, rounds)
            for i, row in enumerate(per_rank[0]):
                same = [r[i] for r in per_rank]
                round_seconds = [max(r["round_seconds"][k] for r in same) for k in range(rounds)]
                row = dict(
                    row,
                    case=name,
                    round_seconds=round_seconds,
                    seconds=statistics.median(round_seconds),
                    expert_spread=max(r["expert_seconds"] for r in same) - min(r["expert_seconds"] for r in same),
                    combine_spread=max(r["combine_seconds"] for r in same) - min(r["combine_seconds"] for r in same),
                    fwd_bytes_per_token=sum(r["fwd_bytes_per_token"] for r in same) / ep,
                    bwd_bytes_per_token=sum(r["bwd_bytes_per_token"] for r in same) / ep,
                )
                row["model_bytes_per_token"] = expected_bytes_per_token(
                    row["dispatcher"],
                    layer_kwargs["d_model"],
                    layer_kwargs["d_low"],
                    layer_kwargs["num_experts"],
                    layer_kwargs["top_k"],
                    ep,
                    aoe_cache=row["scorer"] == "aoe",
                    combine=row["route"] or "rank",
                )["fwd"]
                case_results.append(row)
        text.append(format_results(case_results, layer_kwargs, case_tokens, name))
        results += case_results
    print("\n\n".join(text))
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results


def _label(row: dict) -> str:
    return row["dispatcher"] if row["route"] is None else f"{row['dispatcher']}/{row['route']}"


def _paired(a: dict, b: dict) -> float:
    """Median over rounds of a's time / b's time (the same round of both)."""
    return statistics.median(x / y for x, y in zip(a["round_seconds"], b["round_seconds"]))


def format_results(results: list[dict], layer: dict, tokens: int, name: str = "main") -> str:
    rounds = len(results[0]["round_seconds"]) if results else 0
    lines = [
        f"dispatch benchmark, case {name}: d={layer['d_model']} d_ffn={layer['d_ffn']} d_low={layer['d_low']} "
        f"n={layer['num_experts']} K={layer['top_k']}, {tokens} tokens per rank, forward+backward, gloo, "
        f"{rounds} round(s)",
        f"{'scorer':<8}{'EP':>3} {'dispatcher':<15}{'fwd B/tok':>11}{'model':>9}{'bwd B/tok':>11}"
        f"{'ms/step':>9}{'expert ms':>10}{'combine ms':>11}{'spread ms':>10}",
    ]
    for r in results:
        lines.append(
            f"{r['scorer']:<8}{r['ep']:>3} {_label(r):<15}{r['fwd_bytes_per_token']:>11.1f}"
            f"{r['model_bytes_per_token']:>9.1f}{r['bwd_bytes_per_token']:>11.1f}{r['seconds'] * 1e3:>9.1f}"
            f"{r['expert_seconds'] * 1e3:>10.1f}{r['combine_seconds'] * 1e3:>11.1f}"
            f"{r['combine_spread'] * 1e3:>10.1f}"
        )
    lines.append("ratios (bytes fwd; time: median of the per-round ratios):")
    for scorer in SCORERS:
        for ep in sorted({r["ep"] for r in results if r["ep"] > 1}):
            by = {(r["dispatcher"], r["route"]): r for r in results if r["scorer"] == scorer and r["ep"] == ep}
            gather, rank, pair = by[("allgather", None)], by[("alltoall", "rank")], by[("alltoall", "pair")]
            lines.append(
                f"  {scorer:<7} EP={ep}: allgather / alltoall bytes "
                f"{gather['fwd_bytes_per_token'] / rank['fwd_bytes_per_token']:.2f}, time "
                f"{_paired(gather, rank):.2f}; alltoall rank / pair bytes "
                f"{rank['fwd_bytes_per_token'] / pair['fwd_bytes_per_token']:.2f}, time "
                f"{_paired(rank, pair):.2f}"
            )
    return "\n".join(lines)
