"""aoe-ep: expert-parallel training of Autonomy-of-Experts, Self-Routing and routed MoE language models."""

__version__ = "0.1.0"
