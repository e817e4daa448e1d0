"""Aux-loss-free load balancing (`moe.balance: bias`; DeepSeek-V3, Section 2.1.2; Wang et al. 2024, "Auxiliary-
Loss-Free Load Balancing Strategy for Mixture-of-Experts").

Each MoE layer holds a per-expert bias b [n] (the buffer `expert_bias`, zero at start) that `selection.decide` adds
to the scores for the selection decision only: top-K ranks s + b (top-P the softmax of s + b), while the gates, the
aux and entropy terms and every gradient use the unbiased scores. After every applied optimiser step the bias moves
by a fixed rate against its expert's load error,

    b_i <- b_i + rate · sign(mean_j c_j − c_i),

where c_i is the number of tokens expert i processed in that step: all micro-batches, over the whole data-parallel
world. The counts are the same numbers on every rank, so the bias is too; the trainer forms them in the step's one
world-wide reduction. The layer never sees ranks: its scheme (`aoe_ep.moe.balancing.BiasBalancing`) reads the
buffer in the decision and moves it by `bias_update`.

megatron-core's `get_updated_expert_bias` applies the same rule, but all-reduces the counts itself over the
global `parallel_state` group; here the counts are already global, so only the rule is written out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from aoe_ep.moe.layer import MoEInfo, MoELayer


def bias_update(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> torch.Tensor:
    """The new bias b + rate·sign(mean(c) − c) from the step's global token counts c [n] (counts of 0 or ties with
    the mean are fine: sign 0 leaves that bias where it is)."""
    counts_E = tokens_per_expert_E.detach().to(torch.float64)
    error_E = counts_E.mean() - counts_E
    return bias_E + rate * torch.sign(error_E).to(bias_E.dtype)


def step_token_counts(
    infos: Sequence[Sequence[MoEInfo]], layers: Sequence[MoELayer], device: torch.device
) -> torch.Tensor:
    """[L, n] float64: Σ over the step's micro-batches of each layer's `tokens_per_expert` (each already global over
    its expert-parallel group); `infos` holds, per micro-batch, every MoE layer's `MoEInfo` in layer order."""
    counts_LE = torch.zeros(len(layers), layers[0].cfg.num_experts if layers else 0, dtype=torch.float64, device=device)
    for micro in infos:
        counts_LE += torch.stack([info.stats.tokens_per_expert.to(counts_LE) for info in micro])
    return counts_LE
