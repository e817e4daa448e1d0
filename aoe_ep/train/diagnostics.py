"""AoE diagnostics logged with the load: how decisive the selection is (score margin), how much it moves between two
logs (top-K churn on a fixed probe batch), experts that got no token over the log window (dead experts), and the
share of AoE's low-rank precompute that unselected experts throw away.

The margin is a layer statistic (`LoadStats.score_margin`, summed over the window like the counts); dead experts
and the wasted precompute follow from the window's counts. Churn needs the same tokens at every log: the probe is
one global batch of fixed samples (the validation set's first, else the training set's), each rank scoring its
share in the trainer's micro-batch layout, so the probe is the same whatever the layout; its selections are the
layers' global decisions, and the changed-token counts are summed over every rank, so each rank gets the same churn.

The previous selections live on the trainer only, not in the checkpoint (for a large run they are tokens x experts
x layers booleans, and a layout-free form would need a gather): a run, fresh or resumed, probes once before its
first step when that step is a multiple of `train.log_interval`, i.e. when the uninterrupted run logged there and
held the same selections, so the resumed run logs the same churn; otherwise its first log omits churn.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional

import torch

from aoe_ep.log_keys import layer_prefix
from aoe_ep.moe import LoadStats
from aoe_ep.moe.context import DEFAULT_CONTEXT, StepContext
from aoe_ep.parallel.runtime import all_reduce_
from aoe_ep.train.batches import BatchPlan, collate


def dead_experts(stats: LoadStats) -> int:
    """Experts that processed no token of the window."""
    return int((stats.tokens_per_expert == 0).sum())


def wasted_precompute(stats: LoadStats) -> float:
    """(T·n − Σ_i tokens_i) / (T·n): AoE computes every expert's low-rank cache for every token (T·n rows) and only
    the selected (token, expert) pairs use theirs (1 − K/n under top-K)."""
    rows = stats.num_tokens * stats.tokens_per_expert.numel()
    return float(rows - int(stats.tokens_per_expert.sum())) / rows if rows else 0.0


def diagnostic_scalars(stats: list[LoadStats], scorer: str, churn: Optional[list[float]]) -> dict[str, float]:
    """Per layer `score_margin` (where the selection has one), `churn` (where given), `dead_experts` and, for AoE,
    `wasted_precompute`; plus the total `moe/dead_experts`."""
    out: dict[str, float] = {}
    for i, s in enumerate(stats):
        prefix = layer_prefix(i)
        if int(s.margin_tokens):
            out[f"{prefix}/score_margin"] = float(s.score_margin)
        if churn is not None:
            out[f"{prefix}/churn"] = float(churn[i])
        out[f"{prefix}/dead_experts"] = float(dead_experts(s))
        if scorer == "aoe":
            out[f"{prefix}/wasted_precompute"] = wasted_precompute(s)
    if stats:
        out["moe/dead_experts"] = float(sum(dead_experts(s) for s in stats))
    return out


def probe_tokens(dataset: Any, plan: BatchPlan, device: torch.device) -> list[torch.Tensor]:
    """This rank's share of samples [0, global_samples) of `dataset`, one [mbs, seq] tensor per micro-batch."""
    return [collate(dataset, plan.indices(0, micro), device).tokens for micro in range(plan.num_micro_batches)]


class ChurnProbe:
    """Top-K churn of a fixed probe batch: the share of its tokens whose selected expert set changed since the
    previous `update`, per MoE layer. `tokens`: this rank's share of the probe (see `probe_tokens`)."""

    def __init__(self, tokens: list[torch.Tensor]):
        self.tokens = tokens
        self.previous: Optional[list[torch.Tensor]] = None

    @torch.no_grad()
    def selections(
        self, model, moe_layers: list, autocast=contextlib.nullcontext, ctx: StepContext = DEFAULT_CONTEXT
    ) -> list[torch.Tensor]:
        """Per MoE layer, the selection mask [probe tokens of this rank, n] in eval mode (collective under EP), the
        layers running under `ctx` with `record_selection` set; their byte counters are paused, so logged bytes stay
        those of training steps."""
        was_training = model.training
        model.eval()
        masks: list[list[torch.Tensor]] = [[] for _ in moe_layers]
        recording = dataclasses.replace(ctx, record_selection=True)
        with contextlib.ExitStack() as stack:
            for layer in moe_layers:
                stack.enter_context(layer.dispatcher.counter.paused())
            for tokens in self.tokens:
                with autocast():
                    infos = model(tokens, ctx=recording).moe
                for per_layer, info in zip(masks, infos):
                    per_layer.append(info.mask_TE)
        model.train(was_training)
        return [torch.cat(m) for m in masks]

    def update(
        self, model, moe_layers: list, group=None, autocast=contextlib.nullcontext, ctx: StepContext = DEFAULT_CONTEXT
    ) -> Optional[list[float]]:
        """Probe now; the churn per layer since the previous probe, summed over the ranks of `group` (default: the
        world), or None at the first probe (collective)."""
        masks = self.selections(model, moe_layers, autocast, ctx)
        previous, self.previous = self.previous, masks
        if previous is None:
            return None
        counts_L2 = torch.stack(
            [
                torch.stack([(now != before).any(dim=1).sum(), now.new_tensor(now.shape[0], dtype=torch.int64)])
                for now, before in zip(masks, previous)
            ]
        ).double()
        all_reduce_(counts_L2, group=group)
        return (counts_L2[:, 0] / counts_L2[:, 1].clamp_min(1)).tolist()
