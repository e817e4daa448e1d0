"""`aoe-ep bench layer`: forward+backward throughput of AoE vs routed MoE (equal parameters, Eq. 5) vs a dense
SwiGLU FFN with the MoE's active expert FLOPs, measured side by side in interleaved rounds and printed as ratios
next to the FLOP bound of the cost model (docs/design.md section 3), with the activation memory each keeps for backward.

Contenders of every layer case:
- `moe`, `aoe`, `dense`: the three layers above; `aoe_recompute`: AoE with `moe.aoe_cache: recompute` (its leanest
  mode when an aux loss is on);
- `experts`: the MoE layer's own experts on already-grouped, balanced rows (T·K rows, no scoring, no dispatch), so
  `moe/experts` shows what routing and dispatch cost around the matmuls; `experts_<kernel>`: the same with the
  other expert kernel, which shows the kernel choice;
- `loop_reference`: the obvious AoE layer (one `nn.Linear` per expert, a masked loop, the layer's tie rule;
  `bench/reference.py`), a speed baseline (the layer's math is checked against `aoe_ep/moe/reference.py`);
- `moe_erc`: the routed MoE with the ERC loss (weight 1, α 1), whose FLOPs 2·n²·d·D per step are spread over the
  case's tokens in its bound (`moe_erc/moe`: the paper measured 0.2-0.8% overhead at its scale);
- `threshold`: AoE's scorer with threshold selection (Routing-Free MoE), its learned b set from the case's inputs so
  that each expert fires on K/n of the tokens (`calibrate_threshold`): as many experts per token as top-K, so
  `threshold/aoe` has the FLOP bound 1 and shows what a threshold costs against a top-K sort.
A case with `skew: hot_expert` adds `moe_skewed` and `aoe_skewed`: the same layers on inputs shifted along the
direction that raises one expert's score, until that expert gets about half of the rows (measured, not forced).
A case with `model:` measures a whole decoder slice instead (dense, MoE, AoE, AoE recompute): saved activation
bytes of one forward (the paper's Table 4 memory column), and its throughput.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from aoe_ep.bench.measure import interleaved_samples, interleaved_times, paired_speedup, step_memory
from aoe_ep.bench.reference import LoopAoE
from aoe_ep.config import CONFIGS_DIR, Config, ModelConfig, MoEConfig, resolve_config_path
from aoe_ep.cpu_allocator import active_allocator
from aoe_ep.model.decoder import Decoder, token_cross_entropy
from aoe_ep.model.ffn import DenseSwiGLU
from aoe_ep.moe import MoELayer
from aoe_ep.moe.cost import dense_flops, erc_flops, moe_flops
from aoe_ep.moe.grouped import Groups, choose_kernel
from aoe_ep.train.flops import forward_flops_per_token

DEFAULT_CASES = CONFIGS_DIR / "bench" / "layer.yaml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Contender:
    """A module to time, its forward FLOPs per token, how its input is made from the case's tokens x [T, d], and
    what to set on the module from them before timing (`prepare(module, x)`)."""

    name: str
    module: torch.nn.Module
    flops_per_token: float
    make_input: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    prepare: Optional[Callable[[torch.nn.Module, torch.Tensor], None]] = None


class ExpertsOnly(torch.nn.Module):
    """A layer's experts on `rows_per_token` copies of each token, grouped in equal blocks per expert."""

    def __init__(self, experts: torch.nn.Module, num_experts: int, kernel: Optional[str] = None):
        super().__init__()
        self.experts = experts
        self.num_experts = num_experts
        if kernel is not None:
            experts.kernel = kernel

    def forward(self, x_MD: torch.Tensor) -> torch.Tensor:
        per = x_MD.shape[0] // self.num_experts
        counts = torch.full((self.num_experts,), per, dtype=torch.int64, device=x_MD.device)
        counts[-1] += x_MD.shape[0] - per * self.num_experts
        return self.experts(x_MD, Groups(counts))


def _layer_cfgs(case: dict) -> tuple[MoEConfig, MoEConfig]:
    common = dict(
        d_model=case["d_model"],
        num_experts=case["num_experts"],
        top_k=case["top_k"],
        d_ffn=case["d_ffn"],
        d_low=case["d_low"],
        aux_loss_coeff=case.get("aux_loss_coeff", 0.01),
    )
    return MoEConfig(scorer="router", **common), MoEConfig(scorer="aoe", **common)


@torch.no_grad()
def calibrate_threshold(layer: MoELayer, x_TD: torch.Tensor) -> None:
    """Set a threshold layer's b so that expert i fires on the tokens of x whose score s_i lies above its
    (1 - ρ*) quantile: every expert fires on a ρ* share of the tokens, ρ* = `moe.threshold_density`."""
    s_TE = layer.scorer(x_TD).s_TE.float()
    share = 1.0 - layer.cfg.threshold_density
    layer.threshold_bias.copy_(torch.quantile(s_TE, share, dim=0).to(layer.threshold_bias) - layer.cfg.threshold)


def recompute_flops(cfg: MoEConfig) -> float:
    """AoE's forward FLOPs plus, spread over forward+backward (3× forward), the cache recomputed in backward."""
    return moe_flops(cfg) + 2.0 * cfg.num_experts * cfg.d_model * cfg.d_low / 3.0


def contenders(case: dict, tokens: int, device: torch.device, dtype: torch.dtype) -> list[Contender]:
    moe_cfg, aoe_cfg = _layer_cfgs(case)
    k, n = case["top_k"], case["num_experts"]
    dense_width = k * case["d_ffn"]
    expert_flops = k * dense_flops(case["d_model"], case["d_ffn"])
    moe = MoELayer(moe_cfg)
    threshold_cfg = dataclasses.replace(aoe_cfg, selection="threshold", threshold_density=k / n)
    erc_cfg = dataclasses.replace(moe_cfg, erc_loss_coeff=1.0)
    auto = choose_kernel("auto", device, dtype, widths=(case["d_model"],), rows_per_group=tokens * k / n)
    other = "loop" if auto == "grouped" else "grouped"
    repeat = lambda x: x.repeat(k, 1)  # noqa: E731
    out = [
        Contender("moe", moe, moe_flops(moe_cfg)),
        Contender("aoe", MoELayer(aoe_cfg), moe_flops(aoe_cfg)),
        Contender(
            "aoe_recompute", MoELayer(dataclasses.replace(aoe_cfg, aoe_cache="recompute")), recompute_flops(aoe_cfg)
        ),
        Contender("dense", DenseSwiGLU(case["d_model"], dense_width), dense_flops(case["d_model"], dense_width)),
        Contender("experts", ExpertsOnly(MoELayer(moe_cfg).experts, n), expert_flops, repeat),
        Contender(f"experts_{other}", ExpertsOnly(MoELayer(moe_cfg).experts, n, other), expert_flops, repeat),
        Contender("loop_reference", LoopAoE(aoe_cfg), moe_flops(aoe_cfg)),
        Contender("moe_erc", MoELayer(erc_cfg), moe_flops(erc_cfg) + erc_flops(erc_cfg) / tokens),
        Contender("threshold", MoELayer(threshold_cfg), moe_flops(threshold_cfg), prepare=calibrate_threshold),
    ]
    if case.get("skew") == "hot_expert":
        out += [
            Contender("moe_skewed", out[0].module, moe_flops(moe_cfg)),
            Contender("aoe_skewed", out[1].module, moe_flops(aoe_cfg)),
        ]
    return out


def _hot_direction(layer: MoELayer) -> torch.Tensor:
    """The input direction that raises expert 0's score most: its router row, or the top left-singular vector of
    AoE's Wdown_0 (the direction x Wdown_0 grows fastest along)."""
    if layer.cfg.scorer == "router":
        w = layer.scorer.weight[0].detach().float()
    else:
        w = torch.linalg.svd(layer.scorer.w_down[0].detach().float(), full_matrices=False).U[:, 0]
    return w / w.norm()


def skewed_input(layer: MoELayer, x: torch.Tensor, share: float = 0.5) -> tuple[torch.Tensor, float]:
    """x shifted along `_hot_direction` by the smallest multiple of a tenth of its scale that gives expert 0 about
    `share` of the routed rows (for top-2, half the rows: expert 0 among nearly every token's two); returns the
    input and the share measured."""
    v = _hot_direction(layer).to(x.device, x.dtype)
    scale = float(x.float().std())
    hot = 0.0
    with torch.no_grad():
        for step in range(1, 200):
            shifted = x + 0.1 * step * scale * v
            counts = layer(shifted)[1].stats.tokens_per_expert
            hot = float(counts[0]) / max(int(counts.sum()), 1)
            if hot >= share * 0.98:
                return shifted, hot
    return shifted, hot


def _step_fn(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    def loss() -> torch.Tensor:
        out = module(x)
        if isinstance(out, tuple):
            y, info = out
            return (y * g).sum() + info.aux_loss
        return (out * g).sum()

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        loss().backward()

    return loss, step


def _ratio(tps: dict, flops: dict, a: str, b: str, samples: Optional[dict] = None) -> dict:
    """`measured`: a's throughput over b's, paired within rounds when `samples` are given (`paired_speedup`), with
    the smallest and largest round's ratio as `round_range`."""
    bound = flops[b] / flops[a]
    if samples is None:
        measured, extra = tps[a] / tps[b], {}
    else:
        measured, low, high = paired_speedup(samples, a, b)
        extra = {"round_range": [low, high]}
    return {"pair": f"{a}/{b}", "measured": measured, "bound": bound, "efficiency": measured / bound, **extra}


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": active_allocator(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_case(case: dict, tokens: int, iters: int, rounds: int, device: torch.device, dtype: torch.dtype) -> dict:
    if "model" in case:
        return run_model_case(case, tokens, device, dtype)
    torch.manual_seed(0)
    models = contenders(case, tokens, device, dtype)
    x = torch.randn(tokens, case["d_model"], device=device, dtype=dtype)
    _inputs, steps, memory, params, skew = {}, {}, {}, {}, {}
    for c in models:
        c.module.to(device=device, dtype=dtype)
    for c in models:
        inp = c.make_input(x)
        if c.prepare is not None:
            c.prepare(c.module, inp)
        if c.name.endswith("_skewed"):
            inp, skew[c.name] = skewed_input(c.module, x)
        params[c.name] = sum(p.numel() for p in c.module.parameters())
        probe = c.module(inp)
        g = torch.randn_like(probe[0] if isinstance(probe, tuple) else probe)
        loss, step = _step_fn(c.module, inp, g)
        step()  # warm-up
        memory[c.name] = step_memory(loss, device, params=list(c.module.parameters()))
        steps[c.name] = step
    with tqdm(total=rounds * len(steps), desc=case["name"], leave=False, disable=None) as bar:
        samples = interleaved_samples(steps, iters, rounds, device, progress=bar)
    flops = {c.name: c.flops_per_token for c in models}
    tps = {name: tokens / statistics.median(s) for name, s in samples.items()}
    pairs = [
        ("aoe", "moe"),
        ("aoe", "dense"),
        ("moe", "dense"),
        ("moe", "experts"),
        ("aoe_recompute", "aoe"),
        ("aoe", "loop_reference"),
        ("moe_erc", "moe"),
        ("threshold", "aoe"),
        (next(c.name for c in models if c.name.startswith("experts_")), "experts"),
    ]
    pairs += [(f"{name}_skewed", name) for name in ("moe", "aoe") if f"{name}_skewed" in tps]
    result = {
        "case": case,
        "tokens": tokens,
        "params": params,
        "flops_per_token": flops,
        "tokens_per_s": tps,
        "memory": memory,
        "ratios": [_ratio(tps, flops, a, b, samples) for a, b in pairs],
        "environment": environment(device),
    }
    if skew:
        result["skew"] = {"hot_expert_share": skew}
    return result


def _decoder(case: dict, ffn_cfg: Optional[MoEConfig]) -> Decoder:
    m = case["model"]
    model = ModelConfig(
        n_layers=m["n_layers"],
        d_model=case["d_model"],
        n_heads=m["n_heads"],
        vocab_size=m["vocab_size"],
        max_seq_len=m["seq_len"],
        ffn="moe" if ffn_cfg else "dense",
        d_ffn=case["top_k"] * case["d_ffn"],
    )
    return Decoder(model, ffn_cfg)


def run_model_case(case: dict, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """A decoder slice (`case.model`: n_layers, n_heads, vocab_size, seq_len) per FFN kind: saved activation bytes
    of one forward and one timed forward+backward over `tokens` tokens (sequences of seq_len), its ratios bounded by
    the trainer's model FLOPs per token (attention and logits included)."""
    torch.manual_seed(0)
    moe_cfg, aoe_cfg = _layer_cfgs(case)
    recompute_cfg = dataclasses.replace(aoe_cfg, aoe_cache="recompute")
    seq = case["model"]["seq_len"]
    batch = max(1, tokens // seq)
    tokens_BS = torch.randint(0, case["model"]["vocab_size"], (batch, seq), device=device)
    labels_BS = torch.roll(tokens_BS, -1, dims=1)
    mask_BS = torch.ones_like(tokens_BS, dtype=torch.float32)
    memory, steps, params, flops = {}, {}, {}, {}
    for name, cfg in (("dense", None), ("moe", moe_cfg), ("aoe", aoe_cfg), ("aoe_recompute", recompute_cfg)):
        model = _decoder(case, cfg).to(device=device, dtype=dtype)
        flops[name] = forward_flops_per_token(Config(model=model.cfg, moe=cfg), seq)  # the trainer's model FLOPs

        def loss(model=model) -> torch.Tensor:
            out = model(tokens_BS)
            ce, count = token_cross_entropy(out.logits, labels_BS, mask_BS)
            return ce / count + out.aux_loss

        def step(model=model, loss=loss) -> None:
            for p in model.parameters():
                p.grad = None
            loss().backward()

        params[name] = sum(p.numel() for p in model.parameters())
        memory[name] = step_memory(loss, device, params=list(model.parameters()))
        steps[name] = step
        del model
    seconds = interleaved_times(steps, 1, 1, device)
    tps = {name: batch * seq / s for name, s in seconds.items()}
    ratios = [_ratio(tps, flops, a, b) for a, b in (("aoe", "moe"), ("aoe_recompute", "moe"))]
    return {
        "case": case,
        "tokens": batch * seq,
        "params": params,
        "flops_per_token": flops,
        "tokens_per_s": tps,
        "memory": memory,
        "ratios": ratios,
        "environment": environment(device),
    }


def format_result(r: dict) -> str:
    c = r["case"]
    lines = [
        f"== {c['name']}: d={c['d_model']} d_ffn={c['d_ffn']} d_low={c['d_low']} n={c['num_experts']} "
        f"K={c['top_k']}, {r['tokens']} tokens, forward+backward ({r['environment']['allocator']}, "
        f"{r['environment']['threads']} threads)"
    ]
    has_peak = any("peak_bytes" in m for m in r["memory"].values())
    lines.append(
        f"{'contender':<16}{'params':>13}{'tokens/s':>12}{'saved MiB':>11}" + (f"{'peak MiB':>10}" if has_peak else "")
    )
    for name in r["tokens_per_s"]:
        mem = r["memory"][name]
        line = f"{name:<16}{r['params'][name]:>13,}{r['tokens_per_s'][name]:>12.0f}{mem['saved_bytes'] / 2**20:>11.1f}"
        if has_peak:
            line += f"{mem.get('peak_bytes', 0) / 2**20:>10.1f}"
        lines.append(line)
    lines.append(f"{'ratio':<24}{'measured':>10}{'FLOP bound':>12}{'efficiency':>12}{'rounds':>16}")
    for q in r["ratios"]:
        spread = "{:.3f}-{:.3f}".format(*q["round_range"]) if "round_range" in q else ""
        lines.append(f"{q['pair']:<24}{q['measured']:>10.3f}{q['bound']:>12.3f}{q['efficiency']:>12.3f}{spread:>16}")
    moe_bytes = max(r["memory"]["moe"]["saved_bytes"], 1)
    lines.append(
        "activation memory vs moe: "
        + ", ".join(
            f"{name} {r['memory'][name]['saved_bytes'] / moe_bytes:.3f}" for name in ("aoe", "aoe_recompute", "dense")
        )
    )
    if "skew" in r:
        lines.append(
            "hot expert's share of rows: "
            + ", ".join(f"{name} {share:.2f}" for name, share in r["skew"]["hot_expert_share"].items())
        )
    return "\n".join(lines)


def main(
    cases_path: Optional[str],
    tokens: Optional[int],
    iters: int,
    rounds: int,
    device: str,
    dtype: str,
    out: Optional[str],
) -> list[dict]:
    spec = yaml.safe_load((resolve_config_path(cases_path) if cases_path else DEFAULT_CASES).read_text())
    dev = torch.device(device)
    results = []
    for case in spec["cases"]:
        r = run_case(case, tokens or case.get("tokens") or spec["tokens"], iters, rounds, dev, DTYPES[dtype])
        print(format_result(r), flush=True)
        results.append(r)
        if out:  # written after every case: a long run interrupted keeps what it measured
            Path(out).write_text(json.dumps(results, indent=2))
    return results
