"""`aoe-ep bench layer`: forward+backward throughput of AoE vs routed MoE (equal parameters, Eq. 5) vs a dense
SwiGLU FFN with the MoE's active expert FLOPs, measured side by side and printed as ratios next to the FLOP bound
of the cost model (DESIGN.md section 6), with the activation memory each keeps for backward."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from aoe_ep.config import CONFIGS_DIR, MoEConfig
from aoe_ep.bench.measure import interleaved_times, step_memory
from aoe_ep.model.ffn import DenseSwiGLU
from aoe_ep.moe import MoELayer
from aoe_ep.moe.cost import dense_flops, moe_flops

DEFAULT_CASES = CONFIGS_DIR / "bench" / "layer.yaml"


@dataclass(frozen=True)
class Contender:
    name: str
    module: torch.nn.Module
    flops_per_token: float


def contenders(case: dict) -> list[Contender]:
    common = dict(d_model=case["d_model"], num_experts=case["num_experts"], top_k=case["top_k"], d_ffn=case["d_ffn"],
                  d_low=case["d_low"], aux_loss_coeff=0.01)
    moe_cfg = MoEConfig(scorer="router", **common)
    aoe_cfg = MoEConfig(scorer="aoe", **common)
    dense_width = case["top_k"] * case["d_ffn"]
    return [Contender("moe", MoELayer(moe_cfg), moe_flops(moe_cfg)),
            Contender("aoe", MoELayer(aoe_cfg), moe_flops(aoe_cfg)),
            Contender("dense", DenseSwiGLU(case["d_model"], dense_width), dense_flops(case["d_model"], dense_width))]


def _step_fn(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    def loss() -> torch.Tensor:
        out = module(x)
        if isinstance(out, tuple):
            y, info = out
            return (y * g).sum() + info.aux_loss
        return (out * g).sum()

    def step() -> None:
        loss().backward()

    return loss, step


def run_case(case: dict, tokens: int, iters: int, rounds: int, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    models = contenders(case)
    x = torch.randn(tokens, case["d_model"], device=device, dtype=dtype)
    g = torch.randn_like(x)
    steps, memory, params = {}, {}, {}
    for c in models:
        c.module.to(device=device, dtype=dtype)
        params[c.name] = sum(p.numel() for p in c.module.parameters())
        loss, step = _step_fn(c.module, x, g)
        step()  # warm-up
        memory[c.name] = step_memory(loss, device, params=list(c.module.parameters()))
        steps[c.name] = step
    with tqdm(total=rounds * len(steps), desc=case["name"], leave=False, disable=None) as bar:
        seconds = interleaved_times(steps, iters, rounds, device, progress=bar)
    flops = {c.name: c.flops_per_token for c in models}
    tps = {name: tokens / s for name, s in seconds.items()}
    ratios = []
    for a, b in (("aoe", "moe"), ("aoe", "dense"), ("moe", "dense")):
        measured = tps[a] / tps[b]
        bound = flops[b] / flops[a]
        ratios.append({"pair": f"{a}/{b}", "measured": measured, "bound": bound, "efficiency": measured / bound})
    return {"case": case, "tokens": tokens, "params": params, "flops_per_token": flops, "tokens_per_s": tps,
            "memory": memory, "ratios": ratios}


def format_result(r: dict) -> str:
    lines = [f"== {r['case']['name']}: d={r['case']['d_model']} d_ffn={r['case']['d_ffn']} d_low={r['case']['d_low']} "
             f"n={r['case']['num_experts']} K={r['case']['top_k']}, {r['tokens']} tokens, forward+backward",
             f"{'layer':<7}{'params':>12}{'GFLOP/tok fwd':>15}{'tokens/s':>12}{'saved MiB':>11}"
             + (f"{'peak MiB':>10}" if "peak_bytes" in r["memory"]["moe"] else "")]
    for name in ("moe", "aoe", "dense"):
        mem = r["memory"][name]
        line = (f"{name:<7}{r['params'][name]:>12,}{r['flops_per_token'][name] / 1e9:>15.4f}"
                f"{r['tokens_per_s'][name]:>12.0f}{mem['saved_bytes'] / 2**20:>11.1f}")
        if "peak_bytes" in mem:
            line += f"{mem['peak_bytes'] / 2**20:>10.1f}"
        lines.append(line)
    lines.append(f"{'ratio':<12}{'measured':>10}{'FLOP bound':>12}{'efficiency':>12}")
    for q in r["ratios"]:
        lines.append(f"{q['pair']:<12}{q['measured']:>10.3f}{q['bound']:>12.3f}{q['efficiency']:>12.3f}")
    mem_ratio = r["memory"]["aoe"]["saved_bytes"] / max(r["memory"]["moe"]["saved_bytes"], 1)
    lines.append(f"activation memory aoe/moe: {mem_ratio:.3f}")
    return "\n".join(lines)


def main(cases_path: Optional[str], tokens: Optional[int], iters: int, rounds: int, device: str, dtype: str,
         out: Optional[str]) -> list[dict]:
    spec = yaml.safe_load(Path(cases_path or DEFAULT_CASES).read_text())
    dev = torch.device(device)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
    results = []
    for case in spec["cases"]:
        r = run_case(case, tokens or spec["tokens"], iters, rounds, dev, dt)
        print(format_result(r), flush=True)
        results.append(r)
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results
