"""The layer's fast paths against its float64 self (which the per-token reference holds): the grouped kernel in
fp32, bf16 under autocast, what AoE keeps for backward in each cache mode, no host synchronisation (the whole
forward and backward run on the meta device, which has no data), and the non-raising input check."""

import copy

import pytest
import torch

from aoe_ep.bench.measure import saved_bytes_counter
from aoe_ep.config import MoEConfig
from aoe_ep.moe import MoELayer, StepContext

SCORERS = ("aoe", "router", "self_routing")
# 16-byte-aligned widths in fp32 and bf16, so that the grouped kernel runs; d_wide 12 is padded to 16 in bf16
DIMS = dict(d_model=32, num_experts=4, top_k=2, d_ffn=16, d_low=8, d_wide=12)


def _cfg(scorer, selection="top_k", **over):
    kw = {**DIMS, "capacity_factor": 1.5, "aux_loss_coeff": 0.1, **over}
    return MoEConfig(scorer=scorer, selection=selection, **kw)


def _layers(cfg, dtype, seed=0):
    torch.manual_seed(seed)
    ref = MoELayer(cfg).double()
    other = copy.deepcopy(ref).to(dtype)
    return ref, other


def _run(layer, x, g, autocast=None):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        y, info = layer(x)
        loss = (y.double() * g).sum() + info.aux_loss.double()
    loss.backward()
    grads = {n: p.grad.double() for n, p in layer.named_parameters()}
    return y.double(), info, x.grad.double(), grads


def _separated_input(cfg, gen, tokens=48):
    return torch.randn(tokens, cfg.d_model, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("selection", ["top_k", "top_p", "expert_choice"])
@pytest.mark.parametrize("scorer", SCORERS)
def test_fp32_grouped_kernel_matches_float64(scorer, selection):
    cfg = _cfg(scorer, selection, expert_kernel="grouped")
    ref, fast = _layers(cfg, torch.float32)
    gen = torch.Generator().manual_seed(1)
    x = _separated_input(cfg, gen)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y_ref, info_ref, dx_ref, grads_ref = _run(ref, x, g)
    y, info, dx, grads = _run(fast, x.float(), g)
    assert torch.equal(info.stats.tokens_per_expert, info_ref.stats.tokens_per_expert)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("scorer", SCORERS)
def test_bf16_autocast_matches_float64_within_bf16_tolerance(scorer):
    # fp32 master weights under bf16 autocast, as `train.precision: bf16` runs them
    cfg = _cfg(scorer)
    ref, fast = _layers(cfg, torch.float32, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = _separated_input(cfg, gen)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y_ref, info_ref, dx_ref, grads_ref = _run(ref, x, g)
    y, info, dx, grads = _run(fast, x.float(), g, autocast=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    assert torch.equal(info.stats.tokens_per_expert, info_ref.stats.tokens_per_expert)
    assert _rel(y, y_ref) < 2e-2 and _rel(dx, dx_ref) < 3e-2
    for name in grads_ref:
        assert _rel(grads[name], grads_ref[name]) < 3e-2, name
    aux, aux_ref = float(info.aux_loss.detach()), float(info_ref.aux_loss.detach())
    assert abs(aux - aux_ref) < 1e-3 * abs(aux_ref) + 1e-6


def _saved(layer, x):
    with saved_bytes_counter(exclude=list(layer.parameters())) as saved:
        y, info = layer(x)
    return saved[0]


def test_aoe_cache_modes_keep_what_they_say():
    tokens, cfg_keep = 256, _cfg("aoe", aoe_cache="keep")
    cache_bytes = tokens * cfg_keep.num_experts * cfg_keep.d_low * 4
    x = torch.randn(tokens, cfg_keep.d_model, requires_grad=True)
    keep = _saved(MoELayer(cfg_keep), x)
    recompute = _saved(MoELayer(_cfg("aoe", aoe_cache="recompute")), x)
    sparse_layer = MoELayer(_cfg("aoe", aux_loss_coeff=0.0))
    assert sparse_layer.scorer.mode == "sparse"
    sparse = _saved(sparse_layer, x)
    assert keep - recompute == cache_bytes
    # sparse also saves the selected rows' tokens instead of all of x: x [T, d] vs x rows [T·K, d] shared with
    # the experts, so it saves at most what recompute does
    assert sparse <= recompute


@pytest.mark.parametrize("aoe_cache", ["keep", "recompute"])
@pytest.mark.parametrize("selection", ["top_k", "expert_choice"])
@pytest.mark.parametrize("scorer", SCORERS)
def test_local_layer_has_no_data_dependent_shape_or_host_read(scorer, selection, aoe_cache):
    # meta tensors have no data: `.tolist()`, `.item()`, `nonzero` or a data-dependent shape would raise here.
    # bf16, the dtype the grouped kernel runs in on an accelerator; the hidden width 12 is padded to 16.
    cfg = _cfg(scorer, selection, aoe_cache=aoe_cache)
    layer = MoELayer(cfg).to("meta", torch.bfloat16)
    x = torch.randn(40, cfg.d_model, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y, info = layer(x, ctx=StepContext(input_check="flag"))
    (y.sum() + info.aux_loss).backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert all(p.grad is not None and p.grad.shape == p.shape for p in layer.parameters())


@pytest.mark.parametrize("scorer", SCORERS)
def test_flag_mode_lets_non_finite_input_through_and_counts_it(scorer):
    cfg = _cfg(scorer)
    layer = MoELayer(cfg)
    x = torch.randn(10, cfg.d_model)
    x[3, 5], x[7, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 NaN or infinite"):
        layer(x)
    flag = StepContext(input_check="flag")
    y, info = layer(x, ctx=flag)
    assert int(info.nonfinite_inputs) == 2 and y.shape == x.shape
    _, clean = layer(torch.randn(10, cfg.d_model), ctx=flag)
    assert int(clean.nonfinite_inputs) == 0
    with pytest.raises(ValueError, match="input_check"):
        layer(x, ctx=StepContext(input_check="warn"))
