"""Properties of MoELayer that the per-token reference does not cover: gradients by finite differences, exact ties,
empty and single-token batches, input validation, parameter names/shapes and config validation."""

import math
import zlib

import pytest
import torch
from torch.func import functional_call

from aoe_ep.config import ConfigError, MoEConfig
from aoe_ep.moe import MoELayer

SCORERS = ("aoe", "router", "self_routing")
SELECTIONS = ("top_k", "top_p", "expert_choice")


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


def small_cfg(scorer, selection="top_k", gate="softmax_topk", norm="l2", **over):
    kw = dict(
        d_model=6,
        num_experts=4,
        top_k=2,
        scorer=scorer,
        d_ffn=4,
        d_low=3,
        d_wide=4,
        norm=norm,
        selection=selection,
        gate=gate,
        top_p=0.6,
        capacity_factor=1.0,
        aux_loss_coeff=0.2,
        top_p_entropy_coeff=0.05,
    )
    kw.update(over)
    return MoEConfig(**kw)


def randomize(layer, gen, scale=0.5):
    with torch.no_grad():
        for _, p in sorted(layer.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


# --------------------------------------------------------------------------------------------------------------
# (a) gradcheck
# --------------------------------------------------------------------------------------------------------------


def _scores_for_guard(cfg, params, x):
    """Scores and (for AoE) the cache, written from the formulas; used only to keep gradcheck away from kinks."""
    n = cfg.num_experts
    if cfg.scorer == "router":
        return x @ params["scorer.weight"].T, None
    if cfg.scorer == "self_routing":
        return x[:, cfg.self_routing_offset : cfg.self_routing_offset + n], None
    c = torch.einsum("td,nde->tne", x, params["scorer.w_down"])
    if cfg.norm == "l2":
        s = c.pow(2).sum(-1).sqrt()
    elif cfg.norm == "l1":
        s = c.abs().sum(-1)
    else:
        s = c.abs().amax(-1)
    return s, c


def _well_separated(cfg, params, x, margin=1e-3):
    s, c = _scores_for_guard(cfg, params, x)
    p = torch.softmax(s, -1)
    T, n = s.shape
    if c is not None:
        a = c.abs()
        if a.min() < margin:  # |.| kink (L1) and the L-inf argmax must be stable under eps
            return False
        top2 = a.topk(2, dim=-1).values
        if (top2[..., 0] - top2[..., 1]).min() < margin:
            return False
    if cfg.selection == "top_k":
        v = s.sort(-1, descending=True).values
        return bool((v[:, cfg.top_k - 1] - v[:, cfg.top_k]).min() > margin)
    if cfg.selection == "top_p":
        v = p.sort(-1, descending=True).values
        before = torch.cumsum(v, -1) - v
        return bool((before - cfg.top_p).abs().min() > margin)
    cap = min(T, math.ceil(T * cfg.capacity_factor / n))
    if cap >= T:
        return True
    v = p.sort(0, descending=True).values
    return bool((v[cap - 1] - v[cap]).min() > margin)


GRADCHECK_CASES = [("aoe", norm, sel) for norm in ("l2", "l1", "linf") for sel in SELECTIONS]
GRADCHECK_CASES += [(s, "l2", sel) for s in ("router", "self_routing") for sel in SELECTIONS]


@pytest.mark.parametrize("scorer,norm,selection", GRADCHECK_CASES)
def test_gradcheck(scorer, norm, selection):
    gate = "softmax_all" if selection == "top_p" else "softmax_topk"
    cfg = small_cfg(scorer, selection, gate, norm)
    layer = MoELayer(cfg).to(torch.float64)
    names = [name for name, _ in layer.named_parameters()]
    T = 5
    for attempt in range(50):  # deterministic search for data without near-ties (selection is piecewise constant)
        gen = torch.Generator().manual_seed(_seed(scorer, norm, selection, attempt))
        randomize(layer, gen, scale=0.6)
        x = torch.randn(T, cfg.d_model, generator=gen, dtype=torch.float64)
        params = {k: v.detach() for k, v in layer.named_parameters()}
        if _well_separated(cfg, params, x):
            break
    else:
        pytest.fail("no well-separated test data found")

    inputs = (x.clone().requires_grad_(True),) + tuple(params[k].clone().requires_grad_(True) for k in names)

    def fn(x_in, *ps):
        y, info = functional_call(layer, dict(zip(names, ps)), (x_in,))
        if info.aux_loss.requires_grad:
            return y, info.aux_loss
        return y

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# (b) ties
# --------------------------------------------------------------------------------------------------------------

# Per-token scores with exact ties (n = 4, top_k = 2, top_p = 0.6) and the expected selection with
# "lower expert index first". The P values of the top_p cases are far from the 0.6 boundary.
TIE_PATTERNS = [
    # pattern,               top_k mask,   top_p mask
    ([1.0, 1.0, 1.0, 1.0], [1, 1, 0, 0], [1, 1, 1, 0]),  # P = .25 each: masses before 0, .25, .5, .75
    ([0.5, 2.0, 2.0, 2.0], [0, 1, 1, 0], [0, 1, 1, 0]),  # P = .069, .310 x3: masses 0, .31, .62
    ([2.0, 1.0, 0.5, 1.0], [1, 1, 0, 0], [1, 1, 0, 0]),  # P = .51, .19, .11, .19: masses 0, .51, .70
    ([0.5, 1.0, 2.0, 1.0], [0, 1, 1, 0], [0, 1, 1, 0]),
    ([1.0, 0.5, 1.0, 2.0], [1, 0, 0, 1], [1, 0, 0, 1]),
]


def _dyadic(gen, shape, dtype=torch.float64):
    """Multiples of 1/4 in [-1, 1]: every product and sum below is exact in floating point, so ties are exact
    whatever order a kernel accumulates in."""
    return torch.randint(-4, 5, shape, generator=gen).to(dtype) / 4


def tie_layer(scorer, selection, pattern, seed, **over):
    """A layer where one token gets the scores `pattern` (+ a constant shared by all experts for the router), tied
    experts being tied through identical weights (router rows / AoE w_down slices) or equal x values (self_routing)."""
    n = len(pattern)
    kw = dict(num_experts=n, d_model=max(6, n + 2), aux_loss_coeff=0.01, top_p_entropy_coeff=1e-4)
    kw.update(over)
    cfg = small_cfg(scorer, selection, "softmax_topk", **kw)
    layer = MoELayer(cfg).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    d = cfg.d_model
    pat = torch.tensor(pattern, dtype=torch.float64)
    with torch.no_grad():
        for _, p in sorted(layer.named_parameters()):
            p.copy_(_dyadic(gen, p.shape))
        x = _dyadic(gen, (d,))
        x[0] = 1.0
        if scorer == "router":
            w = _dyadic(gen, (d,)).repeat(n, 1)  # identical rows ...
            w[:, 0] += pat  # ... plus pattern_i * x[0]
            layer.get_parameter("scorer.weight").copy_(w)
        elif scorer == "aoe":
            wd = torch.zeros(n, d, cfg.d_low, dtype=torch.float64)
            wd[:, 0, 0] = pat  # C_i = [pattern_i, 0, 0]: every norm gives pattern_i
            layer.get_parameter("scorer.w_down").copy_(wd)
        else:
            x[:n] = pat
    return layer, x.unsqueeze(0)


def _check_selected_experts(layer, x, expected, what):
    y1, info1 = layer(x)
    y2, info2 = layer(x)
    assert info1.stats.tokens_per_expert.tolist() == expected, (what, info1.stats.tokens_per_expert.tolist())
    assert info2.stats.tokens_per_expert.tolist() == expected
    assert torch.equal(y1, y2)
    # the output depends on exactly the selected experts: changing an unselected expert's w_o changes nothing,
    # changing a selected one's does
    w_o = layer.get_parameter("experts.w_o")
    for i in range(len(expected)):
        with torch.no_grad():
            w_o[i] += 0.5
        y3, _ = layer(x)
        with torch.no_grad():
            w_o[i] -= 0.5
        if expected[i]:
            assert not torch.allclose(y3, y1, rtol=0, atol=1e-6), (what, i)
        else:
            assert torch.equal(y3, y1), (what, i)


@pytest.mark.parametrize("selection", ["top_k", "top_p"])
@pytest.mark.parametrize("scorer", SCORERS)
def test_ties_lower_expert_index_wins(scorer, selection):
    for k, (pattern, mask_k, mask_p) in enumerate(TIE_PATTERNS):
        expected = mask_k if selection == "top_k" else mask_p
        layer, x = tie_layer(scorer, selection, pattern, _seed("tie", scorer, selection, k))
        _check_selected_experts(layer, x, expected, pattern)


@pytest.mark.parametrize("selection", ["top_k", "top_p"])
@pytest.mark.parametrize("scorer", SCORERS)
def test_ties_many_experts(scorer, selection):
    # 20 experts, all tied (an unstable sort reorders ties from about 17 elements on); 3 of them score higher.
    # top_k = 5: the 3 high ones, then experts 0 and 1.
    # top_p = 0.33 over 20 equal P = 0.05: masses before 0, .05, ..., .30 < .33 -> the first 7 experts.
    n = 20
    if selection == "top_k":
        pattern = [0.5] * n
        for i in (4, 11, 17):
            pattern[i] = 1.0
        expected = [1 if i in (0, 1, 4, 11, 17) else 0 for i in range(n)]
        over = dict(top_k=5)
    else:
        pattern = [0.5] * n
        expected = [1] * 7 + [0] * (n - 7)
        over = dict(top_p=0.33)
    layer, x = tie_layer(scorer, selection, pattern, _seed("tie20", scorer, selection), **over)
    _check_selected_experts(layer, x, expected, "20 experts")


@pytest.mark.parametrize("scorer", SCORERS)
def test_top_p_exact_boundary(scorer):
    # four tied experts, P = 0.25 each (exact): an expert is kept iff the mass ranked before it is < top_p, so a
    # prefix whose mass equals top_p exactly is complete
    for top_p, expected in [(0.25, [1, 0, 0, 0]), (0.5, [1, 1, 0, 0]), (0.75, [1, 1, 1, 0]), (1.0, [1, 1, 1, 1])]:
        layer, x = tie_layer(scorer, "top_p", [1.0] * 4, _seed("tpb", scorer), top_p=top_p)
        _check_selected_experts(layer, x, expected, top_p)


def ec_layer(scorer, seed, n=4):
    cfg = small_cfg(scorer, "expert_choice", "softmax_topk", num_experts=n, capacity_factor=1.0)
    layer = MoELayer(cfg).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(layer.named_parameters()):
            p.copy_(_dyadic(gen, p.shape))
    return cfg, layer, gen


@pytest.mark.parametrize("scorer", SCORERS)
def test_expert_choice_ties_identical_tokens(scorer):
    # 24 identical tokens, 4 experts, capacity ceil(24 * 1 / 4) = 6: every expert takes tokens 0..5
    # (an unstable sort reorders ties from about 17 elements on)
    cfg, layer, gen = ec_layer(scorer, _seed("ec-ident", scorer))
    x = _dyadic(gen, (1, cfg.d_model)).repeat(24, 1)
    y1, info1 = layer(x)
    y2, info2 = layer(x)
    assert info1.stats.tokens_per_expert.tolist() == [6, 6, 6, 6]
    assert torch.equal(info1.stats.tokens_per_expert, info2.stats.tokens_per_expert)
    assert torch.equal(y1, y2)
    assert y1[0].abs().max() > 1e-6
    torch.testing.assert_close(y1[:6], y1[:1].expand(6, -1), rtol=1e-12, atol=0)
    assert torch.equal(y1[6:], torch.zeros_like(y1[6:])), y1


@pytest.mark.parametrize("scorer", SCORERS)
def test_expert_choice_ties_lower_token_wins(scorer):
    # 2 experts, 4 tokens, capacity 2. Scores S[t] = (x[t,0], x[t,1]) (for AoE through w_down slices that read one
    # channel each); tokens 1 and 3 are identical.
    #   expert 0 ranks tokens by P0 = sigmoid(x0 - x1): t0 (2) > t1 = t3 (1) > t2 (-1)  -> takes t0, t1
    #   expert 1 ranks tokens by P1:                    t2 > t1 = t3 > t0               -> takes t2, t1
    # so token 3 is taken by nobody.
    cfg, layer, gen = ec_layer(scorer, _seed("ec-low", scorer), n=2)
    with torch.no_grad():
        if scorer == "router":
            w = torch.zeros(2, cfg.d_model, dtype=torch.float64)
            w[0, 0] = w[1, 1] = 1.0
            layer.get_parameter("scorer.weight").copy_(w)
        elif scorer == "aoe":
            wd = torch.zeros(2, cfg.d_model, cfg.d_low, dtype=torch.float64)
            wd[0, 0, 0] = wd[1, 1, 0] = 1.0
            layer.get_parameter("scorer.w_down").copy_(wd)
    rest = _dyadic(gen, (4, cfg.d_model - 2))
    head = torch.tensor([[2.5, 0.5], [1.5, 0.5], [0.5, 1.5], [1.5, 0.5]], dtype=torch.float64)
    x = torch.cat([head, rest], 1)
    x[3] = x[1]
    y1, info1 = layer(x)
    y2, info2 = layer(x)
    assert info1.stats.tokens_per_expert.tolist() == [2, 2]
    assert torch.equal(y1, y2) and torch.equal(info1.stats.tokens_per_expert, info2.stats.tokens_per_expert)
    assert torch.equal(y1[3], torch.zeros_like(y1[3])), y1
    for t in range(3):
        assert y1[t].abs().max() > 1e-6, (t, y1)


# --------------------------------------------------------------------------------------------------------------
# (c) zero tokens, (d) one token
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0xd", "2x0xd"])
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("scorer", SCORERS)
def test_zero_tokens(scorer, selection, lead):
    cfg = small_cfg(scorer, selection)
    layer = MoELayer(cfg).to(torch.float64)
    x = torch.zeros(*lead, cfg.d_model, dtype=torch.float64, requires_grad=True)
    y, info = layer(x)
    assert y.shape == x.shape
    aux = info.aux_loss
    assert aux.dim() == 0 and torch.isfinite(aux) and aux.item() == 0.0
    st = info.stats
    assert st.tokens_per_expert.tolist() == [0] * cfg.num_experts
    assert torch.as_tensor(st.load).tolist() == [0.0] * cfg.num_experts
    assert torch.as_tensor(st.score_mean).tolist() == [0.0] * cfg.num_experts
    for field in ("ent_load", "ent_conf", "max_minus_min"):
        assert float(getattr(st, field)) == 0.0, field
    assert int(st.num_tokens) == 0
    (y.sum() + aux).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and (p.grad == 0).all()), name


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("scorer", SCORERS)
def test_one_token(scorer, selection):
    cfg = small_cfg(scorer, selection)
    layer = MoELayer(cfg).to(torch.float64)
    gen = torch.Generator().manual_seed(_seed("one", scorer, selection))
    randomize(layer, gen)
    xb = torch.randn(7, cfg.d_model, generator=gen, dtype=torch.float64)
    for shape in [(1, cfg.d_model), (1, 1, cfg.d_model)]:
        x = xb[3].reshape(shape).clone().requires_grad_(True)
        y, info = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert torch.isfinite(info.aux_loss)
        tpe = info.stats.tokens_per_expert.tolist()
        assert int(info.stats.num_tokens) == 1
        if selection == "top_k":
            assert sum(tpe) == cfg.top_k and max(tpe) == 1
        elif selection == "top_p":
            assert 1 <= sum(tpe) <= cfg.num_experts and max(tpe) == 1
        else:  # capacity min(1, ceil(1 * 1.0 / 4)) = 1: every expert takes the token
            assert tpe == [1] * cfg.num_experts
            assert info.aux_loss.item() == 0.0
        (y.sum() + info.aux_loss).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        if selection != "expert_choice":
            # token choice is per token: alone or inside a batch, a token gets the same output
            yb, _ = layer(xb)
            torch.testing.assert_close(y.detach().reshape(-1), yb[3].detach(), rtol=1e-10, atol=1e-12)


def test_unbatched_vector_input():
    # x [..., d] with no leading dimension is a single token
    cfg = small_cfg("router")
    layer = MoELayer(cfg).to(torch.float64)
    randomize(layer, torch.Generator().manual_seed(3))
    x = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y, info = layer(x)
    assert y.shape == x.shape
    y1, _ = layer(x.unsqueeze(0))
    torch.testing.assert_close(y, y1[0], rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------------------
# (e) input validation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("scorer", SCORERS)
def test_non_finite_input_raises(scorer, bad):
    cfg = small_cfg(scorer)
    layer = MoELayer(cfg)
    x = torch.randn(2, 3, cfg.d_model)
    x[1, 2, 4] = bad
    with pytest.raises(ValueError, match="NaN"):
        layer(x)


@pytest.mark.parametrize("scorer", SCORERS)
def test_wrong_last_dim_raises(scorer):
    cfg = small_cfg(scorer)
    layer = MoELayer(cfg)
    for shape in [(3, cfg.d_model + 1), (2, 3, cfg.d_model - 1)]:
        with pytest.raises(ValueError):
            layer(torch.randn(*shape))


# --------------------------------------------------------------------------------------------------------------
# (f) parameter names and shapes, d_wide
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scorer", SCORERS)
def test_parameter_names_and_shapes(scorer):
    n, d, d_ffn, d_low = 5, 8, 12, 3
    cfg = MoEConfig(d_model=d, num_experts=n, top_k=2, scorer=scorer, d_ffn=d_ffn, d_low=d_low)
    layer = MoELayer(cfg)
    got = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    if scorer == "router":
        want = {
            "scorer.weight": (n, d),
            "experts.w_gate": (n, d, d_ffn),
            "experts.w_p": (n, d, d_ffn),
            "experts.w_o": (n, d_ffn, d),
        }
    elif scorer == "self_routing":
        want = {"experts.w_gate": (n, d, d_ffn), "experts.w_p": (n, d, d_ffn), "experts.w_o": (n, d_ffn, d)}
    else:
        w = cfg.d_wide
        assert isinstance(w, int) and w > 0
        want = {
            "scorer.w_down": (n, d, d_low),
            "experts.w_up": (n, d_low, w),
            "experts.w_p": (n, d, w),
            "experts.w_o": (n, w, d),
        }
    assert got == want
    assert set(layer.state_dict()) == set(want)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    layer64 = layer.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer64.parameters())


def test_d_wide_derivation_and_override():
    cfg = MoEConfig(d_model=768, num_experts=8, top_k=2, scorer="aoe", d_ffn=3072, d_low=256)
    assert cfg.d_wide == 3840 and isinstance(cfg.d_wide, int)
    cfg = MoEConfig(d_model=8, num_experts=4, top_k=2, scorer="aoe", d_ffn=12, d_low=3, d_wide=7)
    assert cfg.d_wide == 7
    layer = MoELayer(cfg)
    assert tuple(layer.get_parameter("experts.w_up").shape) == (4, 3, 7)
    assert tuple(layer.get_parameter("experts.w_o").shape) == (4, 7, 8)


def test_config_defaults():
    cfg = MoEConfig(d_model=8, num_experts=4, top_k=2, scorer="aoe", d_ffn=12, d_low=3)
    assert cfg.norm == "l2" and cfg.selection == "top_k" and cfg.gate == "softmax_topk"
    assert cfg.top_p == 0.6 and cfg.capacity_factor == 2.0
    assert cfg.aux_loss_coeff == 0.01 and cfg.top_p_entropy_coeff == 1e-4
    assert cfg.self_routing_offset == 0 and cfg.dispatcher == "allgather"


# --------------------------------------------------------------------------------------------------------------
# (g) invalid configs
# --------------------------------------------------------------------------------------------------------------

BASE = dict(d_model=8, num_experts=4, top_k=2, scorer="aoe", d_ffn=12, d_low=3)

INVALID = [
    (dict(top_k=5), "top_k"),
    (dict(d_low=0), "d_low"),
    (dict(d_low=-2), "d_low"),
    (dict(norm="l3"), "norm"),
    (dict(selection="foo"), "selection"),
    (dict(scorer="foo"), "scorer"),
    (dict(gate="foo"), "gate"),
    (dict(selection="top_p", top_p=0.0), "top_p"),
    (dict(selection="top_p", top_p=1.5), "top_p"),
    (dict(selection="expert_choice", capacity_factor=0.0), "capacity_factor"),
    (dict(selection="expert_choice", capacity_factor=-1.0), "capacity_factor"),
    (dict(scorer="self_routing", d_model=8, num_experts=16, top_k=2), ("num_experts", "d_model")),
]


@pytest.mark.parametrize(
    "over,field", INVALID, ids=[f"{i}-{f if isinstance(f, str) else f[0]}" for i, (_, f) in enumerate(INVALID)]
)
def test_invalid_config_raises(over, field):
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError) as exc:
        MoELayer(MoEConfig(**{**BASE, **over}))  # rejected by MoEConfig, at the latest by MoELayer
    fields = (field,) if isinstance(field, str) else field
    assert any(f in str(exc.value) for f in fields), str(exc.value)


def test_valid_edge_configs_accepted():
    # the boundaries of the valid ranges must not be rejected
    MoELayer(MoEConfig(**{**BASE, "top_k": 4}))
    MoELayer(MoEConfig(**{**BASE, "selection": "top_p", "top_p": 1.0}))
    MoELayer(MoEConfig(**{**BASE, "scorer": "self_routing", "num_experts": 8, "d_model": 8}))
