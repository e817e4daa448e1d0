"""`aoe-ep plan`: per-rank memory, FLOPs, communication and step time of a configuration under DP × EP layouts,
from the model's own shapes, the layer cost model and the communication model (held against measurement in
tests/plan)."""

from aoe_ep.plan.layout import Plan, plan_layout

__all__ = ["Plan", "plan_layout"]
