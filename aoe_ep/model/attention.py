"""Causal self-attention with rotary position embeddings (RoPE, Su et al. 2021), as in Llama."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aoe_ep.model.kv_cache import LayerKVCache


class Rotary(nn.Module):
    """cos/sin tables for positions [0, max_seq_len); rotates channel pairs (i, i + d_head/2) ("rotate half")."""

    def __init__(self, d_head: int, max_seq_len: int, theta: float):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {d_head}")
        inv_freq_H = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
        angles_SH = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq_H)
        angles_SK = torch.cat([angles_SH, angles_SH], dim=-1)
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        dtype = torch.get_default_dtype()
        self.register_buffer("cos_SH", angles_SK.cos().to(dtype), persistent=False)
        self.register_buffer("sin_SH", angles_SK.sin().to(dtype), persistent=False)

    def forward(self, x_BNSH: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x at positions [offset, offset + S)."""
        seq = x_BNSH.shape[-2]
        cos = self.cos_SH[offset : offset + seq].to(x_BNSH.dtype)
        sin = self.sin_SH[offset : offset + seq].to(x_BNSH.dtype)
        first, second = x_BNSH.chunk(2, dim=-1)
        return x_BNSH * cos + torch.cat([-second, first], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: fused QKV projection, RoPE on q and k, `scaled_dot_product_attention`."""

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, rope_theta: float):
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.wqkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(self.d_head, max_seq_len, rope_theta)
        for linear in (self.wqkv, self.wo):
            nn.init.normal_(linear.weight, std=d_model**-0.5)

    def forward(self, x_BSD: torch.Tensor, cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        """x [B, S, d]; with a cache, x holds the S positions after the cached ones, which it appends."""
        batch, seq, d_model = x_BSD.shape
        qkv_BS3NK = self.wqkv(x_BSD).view(batch, seq, 3, self.n_heads, self.d_head)
        q_BNSH, k_BNSH, v_BNSH = qkv_BS3NK.permute(2, 0, 3, 1, 4).unbind(0)
        past = cache.length if cache is not None else 0
        q_BNSH, k_BNSH = self.rotary(q_BNSH, past), self.rotary(k_BNSH, past)
        if cache is None or past == 0:
            if cache is not None:
                cache.append(k_BNSH, v_BNSH)
            o_BNSH = F.scaled_dot_product_attention(q_BNSH, k_BNSH, v_BNSH, is_causal=True)
        else:
            k_BNTH, v_BNTH = cache.append(k_BNSH, v_BNSH)
            # query i sits at position past + i and sees keys [0, past + i]; is_causal would align it to key i
            mask_ST = (
                None
                if seq == 1
                else (
                    torch.arange(past + seq, device=x_BSD.device)[None, :]
                    <= past + torch.arange(seq, device=x_BSD.device)[:, None]
                )
            )
            o_BNSH = F.scaled_dot_product_attention(q_BNSH, k_BNTH, v_BNTH, attn_mask=mask_ST)
        return self.wo(o_BNSH.transpose(1, 2).reshape(batch, seq, d_model))
