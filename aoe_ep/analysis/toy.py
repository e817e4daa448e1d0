"""The AoE paper's Appendix B toy study: tiny AoE and routed-MoE classifiers (one layer of two experts, top-1) on
three Gaussian classes, trained in two stages, watching which expert takes which class.

Data: class 1 has mean +μ·1, class 2 mean −μ·1, class 3 mean 0, all with standard deviation σ = μ/7 per
coordinate, so the classes do not overlap within three sigma. Stage one trains on classes 1 and 2; stage two adds
class 3. The classifier is `head(MoELayer(x))`: the project's own `MoELayer` (scorer `aoe` or `router`, top-1,
`softmax_all` gates so that the selector gets a gradient through the chosen expert's weight, no aux loss) and a
linear head over the three classes. After every step each class's held-out batch goes through the layer alone and
its `info.stats` (tokens per expert, mean score per expert) are recorded: the load of each expert per class, and the
activation scale (AoE: mean norm of the expert's low-rank activation; MoE: mean router logit).

What the paper describes (App. B, Fig. 5): in stage one the MoE router sends class 1 and class 2 to different
experts, while AoE lets one expert take both (its norm grows, the other stays idle); in stage two MoE splits the new
class 3 across both experts, while in AoE the busy expert's norm for class 3 is low, below the idle one's, so the
idle expert takes class 3 and the load becomes balanced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from aoe_ep.config import MoEConfig
from aoe_ep.moe import MoELayer

SCORERS = ("aoe", "router")


@dataclass(frozen=True)
class ToyConfig:
    dim: int = 16
    mean: float = 1.0
    d_ffn: int = 32
    d_low: int = 8
    stage1_steps: int = 300
    stage2_steps: int = 600  # class 3 moves over to the idle AoE expert gradually (88-92% of it by 600 steps)
    batch_per_class: int = 32
    eval_per_class: int = 256
    lr: float = 1e-2
    seed: int = 0

    @property
    def std(self) -> float:
        return self.mean / 7.0


@dataclass
class ToyTrace:
    """Per recorded step (stage one, then stage two): load[c][e] (share of class c's tokens that expert e takes)
    and score[c][e] (mean score of expert e on class c), and the accuracy on the classes trained so far."""

    scorer: str
    steps: list[int] = field(default_factory=list)
    stage: list[int] = field(default_factory=list)
    load: list[list[list[float]]] = field(default_factory=list)
    score: list[list[list[float]]] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)

    def at_end_of(self, stage: int) -> dict:
        i = max(j for j, s in enumerate(self.stage) if s == stage)
        return {"step": self.steps[i], "load": self.load[i], "score": self.score[i], "accuracy": self.accuracy[i]}


def class_batch(cfg: ToyConfig, label: int, n: int, gen: torch.Generator) -> torch.Tensor:
    sign = (1.0, -1.0, 0.0)[label]
    return sign * cfg.mean + cfg.std * torch.randn(n, cfg.dim, generator=gen)


class ToyClassifier(nn.Module):
    def __init__(self, cfg: ToyConfig, scorer: str):
        super().__init__()
        self.moe = MoELayer(
            MoEConfig(
                d_model=cfg.dim,
                num_experts=2,
                top_k=1,
                scorer=scorer,
                d_ffn=cfg.d_ffn,
                d_low=cfg.d_low,
                gate="softmax_all",
                aux_loss_coeff=0.0,
            )
        )
        self.head = nn.Linear(cfg.dim, 3)

    def forward(self, x_TD: torch.Tensor):
        y_TD, info = self.moe(x_TD)
        return self.head(y_TD), info


@torch.no_grad()
def _observe(model: ToyClassifier, held_out: list[torch.Tensor], classes: int) -> tuple[list, list, float]:
    load, score, correct, total = [], [], 0, 0
    for label, x_TD in enumerate(held_out):
        logits, info = model(x_TD)
        counts = info.stats.tokens_per_expert.double()
        load.append((counts / counts.sum()).tolist())
        score.append(info.stats.score_mean.tolist())
        if label < classes:
            correct += int((logits[:, :classes].argmax(-1) == label).sum())
            total += x_TD.shape[0]
    return load, score, correct / total


def train_toy(cfg: ToyConfig, scorer: str, every: int = 5, progress: bool = False) -> ToyTrace:
    """Stage one (`stage1_steps` Adam steps on classes 1, 2), stage two (`stage2_steps` on all three);
    observations every `every` steps, at the start and at the end of each stage."""
    torch.manual_seed(cfg.seed)
    model = ToyClassifier(cfg, scorer)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    held_out = [class_batch(cfg, c, cfg.eval_per_class, gen) for c in range(3)]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    trace = ToyTrace(scorer=scorer)
    total = cfg.stage1_steps + cfg.stage2_steps
    for step in tqdm(range(total + 1), disable=not progress, desc=f"toy {scorer}", unit="step"):
        stage = 1 if step <= cfg.stage1_steps else 2
        classes = 2 if stage == 1 else 3
        if step % every == 0 or step == cfg.stage1_steps or step == total:
            load, score, acc = _observe(model, held_out, classes)
            trace.steps.append(step)
            trace.stage.append(stage)
            trace.load.append(load)
            trace.score.append(score)
            trace.accuracy.append(acc)
        if step == total:
            break
        x_TD = torch.cat([class_batch(cfg, c, cfg.batch_per_class, gen) for c in range(classes)])
        labels_T = torch.arange(classes).repeat_interleave(cfg.batch_per_class)
        logits, info = model(x_TD)
        loss = F.cross_entropy(logits, labels_T) + info.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return trace


def summarize(traces: dict[str, ToyTrace]) -> dict:
    """The end of each stage, per model: which expert takes each class, and how balanced the load is."""
    out = {}
    for scorer, trace in traces.items():
        out[scorer] = {}
        for stage, classes in ((1, 2), (2, 3)):
            end = trace.at_end_of(stage)
            load = end["load"][:classes]
            overall = [sum(row[e] for row in load) / classes for e in range(2)]
            out[scorer][f"stage{stage}"] = {
                "accuracy": end["accuracy"],
                "expert_of_class": [max(range(2), key=lambda e: row[e]) for row in end["load"]],
                "load_per_class": end["load"],
                "score_per_class": end["score"],
                "overall_load": overall,
            }
    return out


def describe(summary: dict) -> list[str]:
    """One line per model and stage, in the terms of the paper's description."""
    lines = []
    for scorer, stages in summary.items():
        name = "AoE" if scorer == "aoe" else "MoE"
        for stage, s in stages.items():
            n = 2 if stage == "stage1" else 3
            assign = ", ".join(
                f"class {c + 1} -> expert {s['expert_of_class'][c]} ({max(s['load_per_class'][c]):.0%})"
                for c in range(n)
            )
            lines.append(
                f"{name} {stage}: {assign}; overall load {s['overall_load'][0]:.0%} / "
                f"{s['overall_load'][1]:.0%}; accuracy {s['accuracy']:.1%}"
            )
    return lines


def plot(traces: dict[str, ToyTrace], out_dir: Path, stage_boundary: int) -> list[Path]:
    """toy_load.png (share of each class taken by expert 0) and toy_score.png (mean score per expert and class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = ("tab:red", "tab:blue", "tab:green")
    for kind, ylabel in (("load", "share of the class sent to expert 0"), ("score", "mean score")):
        fig, axes = plt.subplots(1, len(traces), figsize=(5.5 * len(traces), 3.8), squeeze=False)
        for ax, (scorer, trace) in zip(axes[0], traces.items()):
            for c in range(3):
                if kind == "load":
                    ax.plot(trace.steps, [obs[c][0] for obs in trace.load], color=colors[c], label=f"class {c + 1}")
                else:
                    for e, style in ((0, "-"), (1, "--")):
                        ax.plot(
                            trace.steps,
                            [obs[c][e] for obs in trace.score],
                            style,
                            color=colors[c],
                            label=f"class {c + 1}, expert {e}",
                        )
            ax.axvline(stage_boundary, color="gray", linestyle=":", linewidth=1)
            ax.set_title("AoE (score: L2 norm of x·Wdown)" if scorer == "aoe" else "MoE (score: router logit)")
            ax.set_xlabel("step (stage two after the dotted line)")
            ax.set_ylabel(ylabel)
            if kind == "load":
                ax.set_ylim(-0.05, 1.05)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"toy_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run_toy(out_dir: str | Path, cfg: Optional[ToyConfig] = None, progress: bool = True) -> dict:
    """Train both models, write toy_load.png, toy_score.png and toy.json to out_dir; returns the summary."""
    cfg = cfg or ToyConfig()
    torch.set_num_threads(1)  # tensors of a few hundred elements: intra-op threads only cost here
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    traces = {scorer: train_toy(cfg, scorer, progress=progress) for scorer in SCORERS}
    summary = summarize(traces)
    figures = plot(traces, out, cfg.stage1_steps)
    (out / "toy.json").write_text(
        json.dumps({"config": cfg.__dict__, "summary": summary, "traces": {k: v.__dict__ for k, v in traces.items()}})
        + "\n"
    )
    return {"summary": summary, "figures": [str(p) for p in figures], "json": str(out / "toy.json")}
