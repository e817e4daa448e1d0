"""Attention's selective recompute (`recompute_activations`): the same values and gradients as the plain forward,
bit for bit, without keeping RoPE's rotated q and k or the output projection's input copy."""

from __future__ import annotations

import copy

import torch

from aoe_ep.bench.measure import kept_bytes_counter
from aoe_ep.model.attention import CausalSelfAttention


def _pair() -> tuple[CausalSelfAttention, CausalSelfAttention]:
    torch.manual_seed(0)
    plain = CausalSelfAttention(d_model=32, n_heads=4, max_seq_len=16, rope_theta=10000.0)
    recomputing = copy.deepcopy(plain)
    recomputing.recompute_activations = True
    return plain, recomputing


def _grads(module: CausalSelfAttention, x_BSD: torch.Tensor) -> list[torch.Tensor]:
    x_BSD = x_BSD.clone().requires_grad_()
    y_BSD = module(x_BSD)
    (y_BSD * y_BSD.detach().sin()).sum().backward()
    return [y_BSD.detach(), x_BSD.grad] + [p.grad for p in module.parameters()]


def test_recompute_equals_the_plain_forward_bit_for_bit():
    plain, recomputing = _pair()
    x_BSD = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    for want, got in zip(_grads(plain, x_BSD), _grads(recomputing, x_BSD), strict=True):
        assert torch.equal(want, got)


def test_recompute_keeps_neither_the_rotated_q_k_nor_the_output_copy():
    plain, recomputing = _pair()
    x_BSD = torch.randn(3, 16, 32, requires_grad=True)
    kept = {}
    for name, module in (("plain", plain), ("recompute", recomputing)):
        with kept_bytes_counter(list(module.parameters())) as count:
            y_BSD = module(x_BSD)
            kept[name] = count()
        del y_BSD
    # q and k after RoPE, fp32; and Wo's input where it is a copy: SDPA's output for q, k, v laid out as the QKV
    # projection lays them out ([B, S, N, H] in memory) is laid out alike on CPU, which makes Wo's input a view of it
    qkv_BSNH = torch.randn(3, 16, 4, 8).transpose(1, 2)
    o_BNSH = torch.nn.functional.scaled_dot_product_attention(qkv_BSNH, qkv_BSNH, qkv_BSNH, is_causal=True)
    o_is_a_view = o_BNSH.transpose(1, 2).is_contiguous()
    assert kept["plain"] - kept["recompute"] == (2 if o_is_a_view else 3) * x_BSD.numel() * 4


def test_no_recompute_without_training_or_with_a_cache():
    """Evaluation and generation run the plain forward (the hooks only matter when backward follows)."""
    plain, recomputing = _pair()
    x_BSD = torch.randn(2, 16, 32)
    recomputing.eval()
    with kept_bytes_counter() as count:
        recomputing(x_BSD.requires_grad_())
        kept_eval = count()
    plain.eval()
    with kept_bytes_counter() as count:
        plain(x_BSD)
        kept_plain = count()
    assert kept_eval == kept_plain
