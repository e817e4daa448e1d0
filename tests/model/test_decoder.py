"""The decoder against a forward pass written here from the Llama formulas (pre-RMSNorm, RoPE, causal softmax
attention, SwiGLU, untied head), its parameter count against `count_parameters`, causality and the aux-loss sum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aoe_ep.config import ModelConfig, MoEConfig, config_from_dict, count_parameters
from aoe_ep.model import Decoder, Rotary, token_cross_entropy


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _model_cfg(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=16, n_heads=2, vocab_size=23, max_seq_len=12, ffn="dense", d_ffn=24)
    base.update(kw)
    return ModelConfig(**base)


def _moe_cfg(**kw) -> MoEConfig:
    base = dict(d_model=16, num_experts=4, top_k=2, scorer="aoe", d_ffn=12, d_low=4, aux_loss_coeff=0.01)
    base.update(kw)
    return MoEConfig(**base)


def _rope_reference(x, theta: float):
    """RoPE as rotations: channel pair (i, i + K/2) at position m turns by m·theta^(-2i/K)."""
    *_, seq, k = x.shape
    out = x.clone()
    for m in range(seq):
        for i in range(k // 2):
            angle = m * theta ** (-2.0 * i / k)
            a, b = x[..., m, i], x[..., m, i + k // 2]
            out[..., m, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., m, i + k // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


def _rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _reference_forward(model: Decoder, tokens):
    """Llama decoder written out: every weight read from the model, nothing else shared with it."""
    cfg = model.cfg
    heads, d = cfg.n_heads, cfg.d_model
    dh = d // heads
    x = model.embed.weight[tokens]
    seq = tokens.shape[1]
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    for block in model.blocks:
        h = _rms(x, block.attn_norm.weight, cfg.norm_eps)
        wq, wk, wv = block.attn.wqkv.weight.chunk(3, dim=0)
        split = lambda t: t.view(t.shape[0], seq, heads, dh).transpose(1, 2)  # noqa: E731
        q = _rope_reference(split(h @ wq.T), cfg.rope_theta)
        k = _rope_reference(split(h @ wk.T), cfg.rope_theta)
        v = split(h @ wv.T)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + causal, dim=-1) @ v
        x = x + attn.transpose(1, 2).reshape(x.shape) @ block.attn.wo.weight.T
        h = _rms(x, block.ffn_norm.weight, cfg.norm_eps)
        f = block.ffn
        x = x + (F.silu(h @ f.w_gate) * (h @ f.w_p)) @ f.w_o
    return _rms(x, model.norm.weight, cfg.norm_eps) @ model.head.weight.T


def test_dense_decoder_matches_the_llama_formulas():
    torch.manual_seed(0)
    model = Decoder(_model_cfg())
    with torch.no_grad():  # non-trivial norm weights, so that a missing norm would show
        for block in model.blocks:
            block.attn_norm.weight.uniform_(0.5, 1.5)
            block.ffn_norm.weight.uniform_(0.5, 1.5)
        model.norm.weight.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 23, (3, 9))
    out = model(tokens)
    torch.testing.assert_close(out.logits, _reference_forward(model, tokens), rtol=1e-10, atol=1e-10)
    assert out.moe == [] and out.aux_loss.item() == 0.0


def test_rotary_matches_rotations_and_keeps_relative_position():
    rotary = Rotary(d_head=8, max_seq_len=16, theta=10000.0)
    x = torch.randn(2, 3, 16, 8)
    torch.testing.assert_close(rotary(x), _rope_reference(x, 10000.0), rtol=1e-6, atol=1e-6)
    # <R(m) q, R(n) k> depends on n - m only
    q, k = torch.randn(8), torch.randn(8)
    rq = rotary(q.expand(16, 8).clone())
    rk = rotary(k.expand(16, 8).clone())
    assert torch.allclose(rq[2] @ rk[5], rq[9] @ rk[12], atol=1e-5)


@pytest.mark.parametrize("scorer", ["aoe", "router", "self_routing"])
def test_moe_decoder_is_causal_and_sums_aux_losses(scorer):
    torch.manual_seed(1)
    model = Decoder(_model_cfg(ffn="moe"), _moe_cfg(scorer=scorer))
    tokens = torch.randint(0, 23, (2, 10))
    out = model(tokens)
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 23
    out2 = model(changed)
    torch.testing.assert_close(out.logits[:, :6], out2.logits[:, :6], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out.logits[:, 6:], out2.logits[:, 6:])
    assert len(out.moe) == 2
    layer_sum = out.moe[0].aux_loss + out.moe[1].aux_loss
    torch.testing.assert_close(out.aux_loss, layer_sum.float(), rtol=1e-6, atol=0.0)
    assert out.aux_loss.item() > 0
    for info in out.moe:
        assert int(info.stats.tokens_per_expert.sum()) == 2 * 10 * 2  # top-2 of 20 tokens


def test_aux_loss_enters_every_selector_gradient_and_vanishes_with_coefficient_zero():
    torch.manual_seed(2)
    tokens = torch.randint(0, 23, (2, 8))
    model = Decoder(_model_cfg(ffn="moe"), _moe_cfg(scorer="router"))
    model(tokens).aux_loss.backward()
    for block in model.blocks:
        assert block.ffn.scorer.weight.grad.abs().sum() > 0
    model0 = Decoder(_model_cfg(ffn="moe"), _moe_cfg(scorer="router", aux_loss_coeff=0.0))
    assert model0(tokens).aux_loss.item() == 0.0


@pytest.mark.parametrize(
    "ffn, moe",
    [
        ("dense", None),
        ("moe", dict(scorer="aoe", num_experts=4, top_k=2, d_ffn=12, d_low=4)),
        ("moe", dict(scorer="router", num_experts=4, top_k=2, d_ffn=12)),
        ("moe", dict(scorer="self_routing", num_experts=4, top_k=1, d_ffn=12)),
    ],
)
def test_parameters_as_built_equal_the_counted_untied_total(ffn, moe):
    raw = {"model": dict(n_layers=3, d_model=16, n_heads=4, vocab_size=50, max_seq_len=8, ffn=ffn, d_ffn=20)}
    if moe:
        raw["moe"] = moe
    cfg = config_from_dict(raw)
    model = Decoder(cfg.model, cfg.moe)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total_untied
    assert model.embed.weight.data_ptr() != model.head.weight.data_ptr()  # untied


def test_token_cross_entropy_masks_tokens():
    logits = torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    total, count = token_cross_entropy(logits, labels, mask)
    expected = sum(-torch.log_softmax(logits[b, s], -1)[labels[b, s]] for b in range(2) for s in range(3) if mask[b, s])
    torch.testing.assert_close(total, expected.float() if total.dtype == torch.float32 else expected)
    assert count.item() == 4


def test_too_long_sequence_is_refused():
    model = Decoder(_model_cfg())
    with pytest.raises(ValueError, match="max_seq_len=12"):
        model(torch.zeros(1, 13, dtype=torch.long))
