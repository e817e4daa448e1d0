"""Router-free and routed Mixture-of-Experts layers: scorers, selection, experts, losses, balancing, statistics, the
step context, the layer."""

from aoe_ep.moe.context import StepContext
from aoe_ep.moe.layer import MoEInfo, MoELayer
from aoe_ep.moe.stats import LoadStats, idle_time

__all__ = ["LoadStats", "MoEInfo", "MoELayer", "StepContext", "idle_time"]
