"""Per-step expert-parallel instrumentation: one object the trainer logs.

Per layer: tokens per expert and per device over the global batch, (max − min) load per expert and per device, and
this step's wall-clock on every rank in expert compute and in the combine (where a rank waits for the slowest), with
max − min across ranks. Summed over layers: the AoE paper's idle-time metric, per expert and per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from aoe_ep.moe.layer import MoEInfo
from aoe_ep.moe.stats import idle_time


@dataclass(frozen=True)
class EPReport:
    """tokens_per_expert [layers, n]; tokens_per_device [layers, EP]; expert_seconds / combine_seconds [EP, layers]
    (rank × layer); idle times summed over layers; bytes: what this rank sent, by collective."""

    tokens_per_expert: torch.Tensor
    tokens_per_device: torch.Tensor
    idle_time_expert: float
    idle_time_device: float
    expert_seconds: torch.Tensor
    combine_seconds: torch.Tensor
    bytes: dict

    def scalars(self, prefix: str = "moe") -> dict[str, float]:
        """Flat name → value pairs for tensorboard."""
        out = {f"{prefix}/idle_time_expert": self.idle_time_expert,
               f"{prefix}/idle_time_device": self.idle_time_device,
               f"{prefix}/expert_seconds_max_minus_min": float(_spread(self.expert_seconds).sum()),
               f"{prefix}/combine_seconds_max_minus_min": float(_spread(self.combine_seconds).sum())}
        for layer in range(self.tokens_per_device.shape[0]):
            device_load = self.tokens_per_device[layer].double()
            device_load = device_load / device_load.sum().clamp_min(1)
            for r, value in enumerate(device_load.tolist()):
                out[f"{prefix}/layer{layer}/device_load/{r}"] = value
            out[f"{prefix}/layer{layer}/expert_seconds_max_minus_min"] = float(_spread(self.expert_seconds)[layer])
            out[f"{prefix}/layer{layer}/combine_seconds_max_minus_min"] = float(_spread(self.combine_seconds)[layer])
        for name, value in self.bytes.items():
            out[f"{prefix}/bytes/{name}"] = float(value)
        return out


def _spread(seconds_RL: torch.Tensor) -> torch.Tensor:
    return seconds_RL.max(dim=0).values - seconds_RL.min(dim=0).values


def ep_report(infos: Sequence[MoEInfo], ep_size: int, ep_group: Optional[dist.ProcessGroup] = None,
              bytes_sent: Optional[dict] = None) -> EPReport:
    """Build the step's report from every MoE layer's info; one all-gather of the timings when `ep_group` is given."""
    stats = [info.stats for info in infos]
    tokens_LE = torch.stack([s.tokens_per_expert for s in stats])
    tokens_LR = tokens_LE.view(len(stats), ep_size, -1).sum(dim=2)
    timing_L2 = torch.tensor([[i.timing.expert_seconds, i.timing.combine_seconds] for i in infos], dtype=torch.float64)
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        gathered = [torch.empty_like(timing_L2) for _ in range(dist.get_world_size(ep_group))]
        dist.all_gather(gathered, timing_L2, group=ep_group)
        timing_RL2 = torch.stack(gathered)
    else:
        timing_RL2 = timing_L2.unsqueeze(0)
    return EPReport(tokens_per_expert=tokens_LE, tokens_per_device=tokens_LR,
                    idle_time_expert=idle_time(stats), idle_time_device=idle_time(stats, ep_size),
                    expert_seconds=timing_RL2[..., 0], combine_seconds=timing_RL2[..., 1],
                    bytes=dict(bytes_sent or {}))
