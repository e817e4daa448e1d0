"""Router-free and routed Mixture-of-Experts layers: scorers, selection, experts, losses, balancing, statistics, the
step context, the layer."""

# Registration by import: the expert-parallel dispatchers (one floor up) register their factories with
# `moe.dispatcher`, so that `MoELayer(cfg, ep_group=group)` finds them. The one import of this package upward, allowed
# by name in the import contract (pyproject.toml); no module under aoe_ep.moe imports aoe_ep.parallel.
import aoe_ep.parallel  # noqa: E402,F401
from aoe_ep.moe.context import StepContext
from aoe_ep.moe.layer import MoEInfo, MoELayer
from aoe_ep.moe.stats import LoadStats, idle_time

__all__ = ["LoadStats", "MoEInfo", "MoELayer", "StepContext", "idle_time"]
