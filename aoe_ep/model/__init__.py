"""Llama-style decoder pieces; the FFN is dense SwiGLU or an MoE layer."""

from aoe_ep.model.ffn import DenseSwiGLU

__all__ = ["DenseSwiGLU"]
