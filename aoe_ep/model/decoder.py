"""Llama-style decoder: token embedding, pre-RMSNorm blocks (RoPE causal attention, then an FFN), final RMSNorm and
an untied output head. The FFN is a dense SwiGLU or an `MoELayer` (routed MoE, AoE or Self-Routing) per config.

The model never asks about ranks: an expert-parallel group, when there is one, is handed to the MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aoe_ep.config import ModelConfig, MoEConfig
from aoe_ep.model.attention import CausalSelfAttention
from aoe_ep.model.ffn import DenseSwiGLU
from aoe_ep.model.kv_cache import KVCache, LayerKVCache
from aoe_ep.moe import MoEInfo, MoELayer
from aoe_ep.moe.context import DEFAULT_CONTEXT, StepContext


@dataclass(frozen=True)
class DecoderOutput:
    """logits [B, S, vocab]; aux_loss: the sum of every MoE layer's auxiliary loss (each already carries its
    coefficient; a 0-dim zero for a dense model); moe: each MoE layer's `MoEInfo`, in layer order."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe: list[MoEInfo]


class DecoderBlock(nn.Module):
    """h = x + Attn(RMSNorm(x)); y = h + FFN(RMSNorm(h))."""

    def __init__(self, model: ModelConfig, moe: Optional[MoEConfig], ep_group=None, index: int = 0):
        super().__init__()
        self.attn_norm = nn.RMSNorm(model.d_model, eps=model.norm_eps)
        self.attn = CausalSelfAttention(model.d_model, model.n_heads, model.max_seq_len, model.rope_theta)
        self.ffn_norm = nn.RMSNorm(model.d_model, eps=model.norm_eps)
        self.is_moe = model.ffn == "moe"
        self.ffn = (
            MoELayer(moe, ep_group=ep_group, index=index) if self.is_moe else DenseSwiGLU(model.d_model, model.d_ffn)
        )

    def mix(self, x_BSD: torch.Tensor, cache: Optional[LayerKVCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block up to its FFN: (h = x + Attn(RMSNorm(x)), the FFN's input RMSNorm(h)). One method, so that
        `train.compile` can compile it as one graph (aoe_ep/train/compile.py)."""
        h_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cache)
        return h_BSD, self.ffn_norm(h_BSD)

    def forward(
        self, x_BSD: torch.Tensor, cache: Optional[LayerKVCache] = None, ctx: StepContext = DEFAULT_CONTEXT
    ) -> tuple[torch.Tensor, Optional[MoEInfo]]:
        h_BSD, n_BSD = self.mix(x_BSD, cache)
        if self.is_moe:
            f_BSD, info = self.ffn(n_BSD, ctx=ctx)
            return h_BSD + f_BSD, info
        return h_BSD + self.ffn(n_BSD), None


class Decoder(nn.Module):
    """`out = model(tokens)` maps tokens [B, S] (S <= max_seq_len) to a `DecoderOutput`. With a `KVCache`
    (`model.new_cache(batch)`), tokens are the S positions after the cached ones (generation). `ctx`: the
    `StepContext` every MoE layer runs under (the trainer's, once per step)."""

    def __init__(self, model: ModelConfig, moe: Optional[MoEConfig] = None, ep_group=None):
        super().__init__()
        model.validate("model")
        if model.ffn == "moe" and moe is None:
            raise ValueError("model.ffn is 'moe' but no MoEConfig was given")
        self.cfg = model
        self.embed = nn.Embedding(model.vocab_size, model.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(model, moe, ep_group, index=i) for i in range(model.n_layers))
        self.norm = nn.RMSNorm(model.d_model, eps=model.norm_eps)
        self.head = nn.Linear(model.d_model, model.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=model.d_model**-0.5)

    def forward(
        self, tokens_BS: torch.Tensor, cache: Optional[KVCache] = None, ctx: StepContext = DEFAULT_CONTEXT
    ) -> DecoderOutput:
        past = cache.length if cache is not None else 0
        if past + tokens_BS.shape[-1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {past + tokens_BS.shape[-1]} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        x_BSD = self.embed(tokens_BS)
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        infos = []
        for index, block in enumerate(self.blocks):
            x_BSD, info = block(x_BSD, cache.layers[index] if cache is not None else None, ctx)
            if info is not None:
                aux = aux + info.aux_loss.float()
                infos.append(info)
        if cache is not None:
            cache.advance(tokens_BS.shape[-1])
        return DecoderOutput(logits=self.head(self.norm(x_BSD)), aux_loss=aux, moe=infos)

    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to max_seq_len positions, on the model's device."""
        weight = self.head.weight
        attn = self.blocks[0].attn
        return KVCache(
            len(self.blocks),
            batch,
            attn.n_heads,
            attn.d_head,
            self.cfg.max_seq_len,
            device=weight.device,
            dtype=weight.dtype,
        )


def token_cross_entropy(
    logits_BSV: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ masked next-token cross-entropy, Σ mask), in fp32 whatever the logits' dtype; the caller divides."""
    ce_N = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), reduction="none")
    mask_N = loss_mask_BS.flatten().to(ce_N.dtype)
    return (ce_N * mask_N).sum(), mask_N.sum()
