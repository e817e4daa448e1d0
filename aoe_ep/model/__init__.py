"""Llama-style decoder with a pluggable FFN: dense SwiGLU, routed MoE, AoE or Self-Routing."""

from aoe_ep.model.attention import CausalSelfAttention, Rotary
from aoe_ep.model.decoder import Decoder, DecoderBlock, DecoderOutput, token_cross_entropy
from aoe_ep.model.ffn import DenseSwiGLU
from aoe_ep.model.init import init_parameters
from aoe_ep.model.kv_cache import KVCache

__all__ = [
    "CausalSelfAttention",
    "Decoder",
    "DecoderBlock",
    "DecoderOutput",
    "DenseSwiGLU",
    "KVCache",
    "Rotary",
    "init_parameters",
    "token_cross_entropy",
]
