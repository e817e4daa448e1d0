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
        # Set by selective activation checkpointing: keep q and k before RoPE (views of the QKV projection, kept
        # anyway) and the attention output once, instead of the rotated copies and the output's copy for Wo.
        self.recompute_activations = False
        for linear in (self.wqkv, self.wo):
            nn.init.normal_(linear.weight, std=d_model**-0.5)

    def forward(self, x_BSD: torch.Tensor, cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        """x [B, S, d]; with a cache, x holds the S positions after the cached ones, which it appends."""
        batch, seq, d_model = x_BSD.shape
        qkv_BS3NK = self.wqkv(x_BSD).view(batch, seq, 3, self.n_heads, self.d_head)
        if self.recompute_activations and self.training and cache is None and torch.is_grad_enabled():
            return self._attend_recomputing(qkv_BS3NK)
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

    def _attend_recomputing(self, qkv_BS3NK: torch.Tensor) -> torch.Tensor:
        """Attention without a cache, keeping for backward the pre-RoPE q and k (views of the QKV projection) in
        place of the rotated ones, and SDPA's output in place of its [B, S, d] copy: saved-tensor hooks swap each for
        its source and recompute it (RoPE, the transpose copy) when backward unpacks it, with the same operations,
        so the gradients are bit for bit those of the plain forward."""
        batch, seq = qkv_BS3NK.shape[:2]
        q_BNSH, k_BNSH, v_BNSH = qkv_BS3NK.permute(2, 0, 3, 1, 4).unbind(0)
        # data pointer of a tensor made here -> (the tensor's layout, its source, how to remake it from the source)
        sources: dict[int, tuple] = {}

        def made(t: torch.Tensor, source: torch.Tensor, remake) -> None:
            sources[t.data_ptr()] = (t.shape, t.stride(), t.is_contiguous(), source.detach(), remake)

        def pack(t: torch.Tensor):
            found = sources.get(t.data_ptr())
            if found is None:
                return t
            shape, stride, contiguous, source, remake = found
            same_layout = t.shape == shape and t.stride() == stride
            if not (same_layout or (contiguous and t.is_contiguous() and t.numel() == shape.numel())):
                return t
            return source, remake, t.shape

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            source, remake, shape = packed
            with torch.no_grad():
                out = remake(source)
            return out if out.shape == shape else out.view(shape)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            qr_BNSH, kr_BNSH = self.rotary(q_BNSH), self.rotary(k_BNSH)
            made(qr_BNSH, q_BNSH, self.rotary)
            made(kr_BNSH, k_BNSH, self.rotary)
            o_BNSH = F.scaled_dot_product_attention(qr_BNSH, kr_BNSH, v_BNSH, is_causal=True)
            o_BSD = o_BNSH.transpose(1, 2).reshape(batch, seq, -1)
            made(o_BSD, o_BNSH, lambda o: o.transpose(1, 2).reshape(batch, seq, -1))
            return self.wo(o_BSD)
