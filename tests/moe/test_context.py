"""The step context: its defaults and its one-line error, and every field reaching every MoE layer of a decoder
(`Decoder.forward` → block → `MoELayer.forward`); `scale_gradient`, the form of the aux loss under
`rank_mean_gradients`, on one device (the expert-parallel case is in tests/parallel/test_step_context.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aoe_ep.config import ModelConfig, MoEConfig
from aoe_ep.model import Decoder
from aoe_ep.moe import MoELayer, StepContext
from aoe_ep.moe.context import DEFAULT_CONTEXT
from aoe_ep.moe.losses import erc_loss, erc_noise, scale_gradient

MOE = dict(d_model=16, num_experts=4, top_k=2, scorer="router", d_ffn=12)


def _decoder(**moe) -> Decoder:
    torch.manual_seed(0)
    return Decoder(
        ModelConfig(n_layers=2, d_model=16, n_heads=2, vocab_size=19, max_seq_len=8, ffn="moe"),
        MoEConfig(**{**MOE, **moe}),
    )


def test_default_context_and_its_errors():
    assert DEFAULT_CONTEXT == StepContext(
        step=0, seed=0, synchronize_timing=False, record_selection=False, input_check="raise", rank_mean_gradients=False
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_CONTEXT.step = 3
    with pytest.raises(ValueError, match="input_check must be one of"):
        StepContext(input_check="ignore")


def test_record_selection_reaches_every_layer_of_the_decoder():
    model = _decoder()
    tokens = torch.randint(0, 19, (2, 8))
    plain = model(tokens).moe
    recorded = model(tokens, ctx=StepContext(record_selection=True)).moe
    assert len(recorded) == 2 and all(info.mask_TE is None for info in plain)
    for info in recorded:
        assert info.mask_TE.shape == (16, 4) and info.mask_TE.sum(dim=1).eq(2).all()
        assert torch.equal(info.mask_TE.sum(dim=0), info.stats.tokens_per_expert)


def test_input_check_reaches_the_layers_of_the_decoder():
    model = _decoder()
    with torch.no_grad():
        model.embed.weight[3, 0] = float("nan")
    tokens = torch.full((1, 4), 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(tokens)
    out = model(tokens, ctx=StepContext(input_check="flag"))
    # the norms before each layer spread the NaN over all 16 channels of the 4 positions
    assert [int(info.nonfinite_inputs) for info in out.moe] == [4 * 16, 4 * 16]


def test_seed_step_and_layer_index_key_each_layers_erc_noise():
    model = _decoder(erc_loss_coeff=0.5)
    tokens = torch.randint(0, 19, (2, 8))
    ctx = StepContext(step=7, seed=5)
    infos = model(tokens, ctx=ctx).moe
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert [layer.index for layer in layers] == [0, 1]
    for i, (layer, info) in enumerate(zip(layers, infos)):
        want, _ = erc_loss(layer.scorer.weight, layer.experts.w_gate, 1.0, erc_noise(4, 16, 5, i, 7))
        torch.testing.assert_close(info.erc_loss, want.detach())
    other = model(tokens, ctx=dataclasses.replace(ctx, step=8)).moe
    assert not torch.equal(other[0].erc_loss, infos[0].erc_loss)


def test_scale_gradient_keeps_the_value_and_scales_the_gradient():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = (x**2).sum()
    scaled = scale_gradient(loss, 3)
    assert torch.equal(scaled, loss)
    (grad,) = torch.autograd.grad(scaled, x)
    torch.testing.assert_close(grad, 3 * 2 * x.detach(), rtol=0, atol=0)


def test_rank_mean_gradients_change_nothing_on_one_device():
    cfg = MoEConfig(**MOE)
    torch.manual_seed(1)
    layer = MoELayer(cfg)
    x = torch.randn(10, 16)
    _, info = layer(x)
    _, info_mean = layer(x, ctx=StepContext(rank_mean_gradients=True))
    assert torch.equal(info.aux_loss, info_mean.aux_loss)
    grads = torch.autograd.grad(info.aux_loss, layer.scorer.weight)
    grads_mean = torch.autograd.grad(info_mean.aux_loss, layer.scorer.weight)
    assert torch.equal(grads[0], grads_mean[0])
