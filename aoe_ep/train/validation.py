"""Validation loss: the token-mean cross-entropy over fixed batches of a dataset. The trainer evaluates with it,
and so does `aoe-ep eval`, so that evaluating a checkpoint gives exactly the value the trainer logged at that step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from aoe_ep.model import token_cross_entropy
from aoe_ep.moe.context import DEFAULT_CONTEXT, StepContext
from aoe_ep.train.batches import BatchPlan, collate


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 for `precision: bf16`, or `auto` on a GPU; None (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(dtype: Optional[torch.dtype], device: torch.device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def num_validation_batches(dataset: Any, plan: BatchPlan, eval_steps: int) -> int:
    """`eval_steps` global batches, or as many as the dataset holds (0 without a dataset)."""
    return min(eval_steps, len(dataset) // plan.global_samples) if dataset is not None else 0


@torch.no_grad()
def validation_sums(
    model,
    moe_layers: list,
    dataset: Any,
    plan: BatchPlan,
    num_batches: int,
    device: torch.device,
    dtype: Optional[torch.dtype],
    progress=None,
    ctx: StepContext = DEFAULT_CONTEXT,
) -> torch.Tensor:
    """[Σ masked cross-entropy, Σ mask] (float64) of this rank's share of global batches [0, num_batches) of
    `dataset`, in the trainer's micro-batch layout; the caller sums over ranks. `progress` (a tqdm bar) advances
    one per global batch; `ctx`: the `StepContext` the MoE layers run under. The MoE layers' byte counters are paused:
    logged bytes are those of training steps."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)
    with contextlib.ExitStack() as uncounted:
        for layer in moe_layers:
            uncounted.enter_context(layer.dispatcher.counter.paused())
        for batch_index in range(num_batches):
            for micro in range(plan.num_micro_batches):
                batch = collate(dataset, plan.indices(batch_index * plan.global_samples, micro), device)
                with autocast(dtype, device):
                    logits = model(batch.tokens, ctx=ctx).logits
                ce_sum, count = token_cross_entropy(logits, batch.labels, batch.loss_mask)
                sums += torch.stack([ce_sum, count]).double()
            if progress is not None:
                progress.update(1)
    model.train(was_training)
    return sums
