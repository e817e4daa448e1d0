"""MoELayer against the per-token reference `aoe_ep.moe.reference`, written from the formulas of the layer contract.

The reference loops over tokens in Python and uses only elementary torch ops and Python sorting for the discrete
choices; it shares nothing with the layer except the parameters, which it reads from the layer by name so that both
sides use identical weights. Everything runs in float64 so that the comparison can be tight.
"""

import math
import zlib

import pytest
import torch

from aoe_ep.config import MoEConfig
from aoe_ep.moe import MoELayer, StepContext, reference
from aoe_ep.moe.losses import erc_noise

RTOL = 1e-9
ATOL = 1e-10

SCORERS = ("aoe", "router", "self_routing")
SELECTIONS = ("top_k", "top_p", "expert_choice")
GATES = ("softmax_topk", "softmax_all")
NORMS = ("l2", "l1", "linf")

D_MODEL = 16
D_FFN = 12
D_LOW = 6
D_WIDE = 10
NUM_EXPERTS = {"aoe": 6, "router": 8, "self_routing": 5}

EXPECTED_PARAMS = {
    "router": ("scorer.weight", "experts.w_gate", "experts.w_p", "experts.w_o"),
    "aoe": ("scorer.w_down", "experts.w_up", "experts.w_p", "experts.w_o"),
    "self_routing": ("experts.w_gate", "experts.w_p", "experts.w_o"),
}

# Scales chosen so that scores of different experts differ by O(1): no accidental ties, and top_p picks a varying
# number of experts per token.
PARAM_SCALE = {
    "scorer.weight": 0.35,
    "experts.w_gate": 0.3,
    "experts.w_p": 0.3,
    "experts.w_o": 0.3,
    "experts.w_up": 0.3,
    "experts.w_down": 0.3,
}
W_DOWN_SCALE = {"l2": 0.3, "l1": 0.12, "linf": 0.35}
X_SCALE = {"aoe": 1.0, "router": 1.0, "self_routing": 1.5}


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


def check_clear_of_ties(cfg, ref, threshold_bias=None):
    """The test data must sit clear of every decision boundary (the tie rule has tests of its own): no near tie at the
    K boundary, no mass near P, no near tie at an expert's capacity, no score near b or b + threshold."""
    n, T = cfg.num_experts, len(ref.ranked)
    if cfg.selection == "threshold":
        for t in range(T):
            for i in range(n):
                v = ref.scores[t][i] - float(threshold_bias[i].detach())
                assert abs(v) > 1e-6 and abs(v - cfg.threshold) > 1e-6, "test data too close to the threshold"
        return
    if cfg.selection == "top_k":
        K = cfg.top_k
        for t in range(T):
            order = sorted(range(n), key=lambda i: (-ref.ranked[t][i], i))
            if K < n:
                assert ref.ranked[t][order[K - 1]] - ref.ranked[t][order[K]] > 1e-6, "test data too close to a tie"
        return
    pv = [[math.exp(v - max(row)) / sum(math.exp(u - max(row)) for u in row) for v in row] for row in ref.ranked]
    if cfg.selection == "top_p":
        for t in range(T):
            mass = 0.0
            for i in sorted(range(n), key=lambda i: (-pv[t][i], i)):
                assert abs(mass - cfg.top_p) > 1e-7, "test data too close to the top_p boundary"
                if mass >= cfg.top_p:
                    break
                mass += pv[t][i]
        return
    cap = min(T, math.ceil(T * cfg.capacity_factor / n))
    for i in range(n):
        order = sorted(range(T), key=lambda t: (-pv[t][i], t))
        if cap < T:
            assert pv[order[cap - 1]][i] - pv[order[cap]][i] > 1e-9, "test data too close to a tie"


# --------------------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------------------


def make_cfg(scorer, selection, gate, norm="l2", **over):
    kw = dict(
        d_model=D_MODEL,
        num_experts=NUM_EXPERTS[scorer],
        top_k=2,
        scorer=scorer,
        d_ffn=D_FFN,
        d_low=D_LOW,
        d_wide=D_WIDE,
        norm=norm,
        selection=selection,
        gate=gate,
        top_p=0.6,
        capacity_factor=2.0,
        aux_loss_coeff=0.3,
        top_p_entropy_coeff=0.05,
    )
    kw.update(over)
    return MoEConfig(**kw)


def build_layer(cfg, seed):
    """A float64 layer whose parameters are overwritten with seeded values (independent of the package's init)."""
    layer = MoELayer(cfg).to(torch.float64)
    names = {name for name, _ in layer.named_parameters()}
    threshold = ("threshold_bias",) if cfg.selection == "threshold" else ()
    expected = EXPECTED_PARAMS[cfg.scorer]
    if cfg.scorer == "router" and cfg.expert_kind == "factorized":  # the paper's Table 2 config 3
        expected = ("scorer.weight", "experts.w_down", "experts.w_up", "experts.w_p", "experts.w_o")
    assert names == set(expected + threshold), names
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(layer.named_parameters()):
            if name == "threshold_bias":  # set by the threshold tests from the scores
                continue
            scale = W_DOWN_SCALE[cfg.norm] if name == "scorer.w_down" else PARAM_SCALE[name]
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return layer


def _close(got, want, what, dtype_hint=None):
    got_t = torch.as_tensor(got).detach()
    want_t = torch.as_tensor(want, dtype=torch.float64)
    # statistics are not required to be float64; allow float32 rounding if the package keeps them in float32
    if got_t.dtype == torch.float32:
        rtol, atol = 1e-5, 1e-6
    else:
        rtol, atol = RTOL, ATOL
    assert tuple(got_t.shape) == tuple(want_t.shape), f"{what}: shape {tuple(got_t.shape)} vs {tuple(want_t.shape)}"
    torch.testing.assert_close(got_t.to(torch.float64), want_t, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run_and_compare(cfg, shape, seed, g_scale=1.0, bias=None, prepare=None, ties=False):
    """`prepare(layer, x0)`, when given, may set up the layer and edit the input x0 in place before both run.
    `ties`: the data may hold exact ties at a decision boundary (else it must sit clear of them)."""
    layer = build_layer(cfg, seed)
    if bias is not None:
        layer.expert_bias.copy_(torch.tensor(bias))
        bias = layer.expert_bias.tolist()  # the values the layer holds, as the reference must see them
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(*shape, cfg.d_model, generator=gen, dtype=torch.float64) * X_SCALE[cfg.scorer]
    g = torch.randn(*shape, cfg.d_model, generator=gen, dtype=torch.float64) * g_scale
    if prepare is not None:
        prepare(layer, x0)
    lam = float(layer.threshold_lambda) if cfg.selection == "threshold" else 1.0
    ctx = StepContext(step=3, seed=11)  # the ERC noise is keyed by (seed, layer index, step)
    u = erc_noise(cfg.num_experts, cfg.d_model, ctx.seed, layer.index, ctx.step)

    # package
    x = x0.clone().requires_grad_(True)
    y, info = layer(x, ctx=ctx)
    assert y.shape == x.shape and y.dtype == torch.float64
    aux = info.aux_loss
    assert torch.is_tensor(aux) and aux.dim() == 0
    loss = (y * g).sum() + aux
    loss.backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}

    # reference, on detached copies of the same parameters
    ref_params = {name: p.detach().clone().requires_grad_(True) for name, p in layer.named_parameters()}
    x_ref = x0.clone().requires_grad_(True)
    ref = reference.forward(
        cfg, ref_params, x_ref, expert_bias=bias, threshold_lambda=lam, erc_noise=u if cfg.erc_loss_coeff > 0 else None
    )
    if not ties:
        check_clear_of_ties(cfg, ref, ref_params.get("threshold_bias"))
    y_ref, aux_ref, stats_ref, masks = ref.y, ref.aux_loss, ref.stats, ref.masks
    loss_ref = (y_ref * g).sum() + aux_ref
    names = sorted(ref_params)
    ref_grads = torch.autograd.grad(loss_ref, [x_ref] + [ref_params[k] for k in names], allow_unused=True)

    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(
        aux.detach().to(torch.float64), aux_ref.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"aux_loss: {m}"
    )

    st = info.stats
    tpe = st.tokens_per_expert
    assert torch.is_tensor(tpe) and tpe.dtype == torch.int64, f"tokens_per_expert dtype {getattr(tpe, 'dtype', None)}"
    assert tpe.tolist() == stats_ref["tokens_per_expert"], (tpe.tolist(), stats_ref["tokens_per_expert"])
    for field in ("load", "ent_load", "ent_conf", "max_minus_min", "score_mean", "score_margin"):
        val = getattr(st, field)
        if torch.is_tensor(val):
            assert not val.requires_grad, f"stats.{field} must be detached"
        _close(val, stats_ref[field], f"stats.{field}")
    assert int(st.num_tokens) == stats_ref["num_tokens"]
    assert int(st.margin_tokens) == stats_ref["margin_tokens"]

    ref_x_grad = ref_grads[0]
    torch.testing.assert_close(x.grad, ref_x_grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad x: {m}")
    for name, rg in zip(names, ref_grads[1:]):
        got = grads[name]
        if rg is None:
            rg = torch.zeros_like(ref_params[name])
        if got is None:
            got = torch.zeros_like(rg)
        torch.testing.assert_close(got, rg, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"grad {name}: {m}")
    if cfg.erc_loss_coeff > 0:
        torch.testing.assert_close(info.erc_loss, ref.erc_loss.detach(), rtol=RTOL, atol=ATOL)
    return masks


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------

CASES = [(s, sel, g, "l2") for s in SCORERS for sel in SELECTIONS for g in GATES]
CASES += [("aoe", sel, g, norm) for norm in ("l1", "linf") for sel in SELECTIONS for g in GATES]
SHAPES = [(3, 4), (13,)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scorer,selection,gate,norm", CASES)
def test_layer_matches_reference(scorer, selection, gate, norm, shape):
    cfg = make_cfg(scorer, selection, gate, norm)
    masks = run_and_compare(cfg, shape, _seed(scorer, selection, gate, norm, shape))
    sizes = [len(m) for m in masks]
    if selection == "top_p":
        # the data must exercise a varying number of experts per token
        assert len(set(sizes)) >= 2, sizes
    if selection == "expert_choice":
        assert len(set(sizes)) >= 2, sizes


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_layer_matches_reference_one_token(scorer, selection):
    cfg = make_cfg(scorer, selection, "softmax_topk")
    run_and_compare(cfg, (1, 1), _seed("one", scorer, selection))


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_layer_matches_reference_zero_tokens(scorer, selection):
    # an empty batch: empty output, zero aux loss, zero counts, and zero gradients on both sides
    cfg = make_cfg(scorer, selection, "softmax_all")
    masks = run_and_compare(cfg, (2, 0), _seed("zero", scorer, selection))
    assert masks == []


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("gate", GATES)
def test_expert_choice_low_capacity_leaves_tokens_unrouted(scorer, gate):
    # capacity = ceil(12 * 0.5 / n): at most 10 of the 12 tokens can be taken, the rest must come out as exactly 0
    cfg = make_cfg(scorer, "expert_choice", gate, capacity_factor=0.5)
    masks = run_and_compare(cfg, (2, 6), _seed("ec", scorer, gate))
    assert any(len(m) == 0 for m in masks), [len(m) for m in masks]


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("top_p", [0.35, 0.9])
def test_top_p_other_thresholds(scorer, top_p):
    cfg = make_cfg(scorer, "top_p", "softmax_topk", top_p=top_p)
    run_and_compare(cfg, (11,), _seed("tp", scorer, top_p))


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("scorer", SCORERS)
def test_top_k_other_k(scorer, top_k):
    cfg = make_cfg(scorer, "top_k", "softmax_topk", top_k=top_k)
    run_and_compare(cfg, (2, 5), _seed("tk", scorer, top_k))


@pytest.mark.parametrize("selection", SELECTIONS)
def test_self_routing_offset(selection):
    cfg = make_cfg("self_routing", selection, "softmax_all", self_routing_offset=3)
    run_and_compare(cfg, (12,), _seed("off", selection))


def test_default_loss_coefficients():
    # the documented defaults (aux_loss_coeff=0.01, top_p_entropy_coeff=1e-4, top_p=0.6) reach the loss
    cfg = MoEConfig(
        d_model=D_MODEL,
        num_experts=6,
        top_k=2,
        scorer="aoe",
        d_ffn=D_FFN,
        d_low=D_LOW,
        d_wide=D_WIDE,
        selection="top_p",
    )
    assert cfg.aux_loss_coeff == 0.01 and cfg.top_p_entropy_coeff == 1e-4 and cfg.top_p == 0.6
    # a large g would drown the aux loss in the gradient; a small one keeps it visible at atol 1e-10
    run_and_compare(cfg, (10,), _seed("defaults"), g_scale=1e-3)


AOE_CASES = [(sel, g, norm) for sel in SELECTIONS for g in GATES for norm in ("l2", "l1", "linf")]


@pytest.mark.parametrize("selection,gate,norm", AOE_CASES)
def test_aoe_recomputed_cache_matches_reference(selection, gate, norm):
    # `recompute` keeps none of the [T, n, d_low] cache and rebuilds it in backward (the default `keep` runs above)
    cfg = make_cfg("aoe", selection, gate, norm, aoe_cache="recompute")
    run_and_compare(cfg, (13,), _seed("recompute", selection, gate, norm))


@pytest.mark.parametrize("aoe_cache", ["keep", "recompute"])
@pytest.mark.parametrize(
    "selection,over",
    [
        ("top_k", dict(aux_loss_coeff=0.0)),
        ("top_p", dict(aux_loss_coeff=0.0, top_p_entropy_coeff=0.0)),
        ("expert_choice", {}),
    ],
)
@pytest.mark.parametrize("norm", ["l2", "l1", "linf"])
def test_aoe_sparse_backward_matches_reference(selection, over, norm, aoe_cache):
    # softmax_topk gates and no loss on the full softmax: unselected experts get no gradient, so only the selected
    # cache rows are kept and Wdown's backward runs over them alone, whatever `aoe_cache` says
    cfg = make_cfg("aoe", selection, "softmax_topk", norm, aoe_cache=aoe_cache, **over)
    assert not cfg.unselected_get_gradient
    assert MoELayer(cfg).scorer.mode == "sparse"
    run_and_compare(cfg, (13,), _seed("sparse", selection, norm, aoe_cache))


# --------------------------------------------------------------------------------------------------------------
# Threshold selection (Routing-Free MoE)
# --------------------------------------------------------------------------------------------------------------


def _threshold_prepare(cfg, seed):
    """Sets b around the middle of the scores and makes token 0 fire every expert and token 1 none: AoE scales
    them (its scores are norms), the router and Self-Routing get logits of +4 and -4 for every expert."""

    def prepare(layer, x0):
        n, gen = cfg.num_experts, torch.Generator().manual_seed(seed + 2)
        xt = x0.view(-1, cfg.d_model)
        with torch.no_grad():
            if cfg.scorer == "aoe":
                xt[0] *= 4.0
                xt[1] *= 0.02
                s_TE = torch.stack(
                    [torch.linalg.vector_norm(xt @ w, ord=layer.scorer.ord, dim=1) for w in layer.scorer.w_down], dim=1
                )
                centre = s_TE[2:].median(dim=0).values
            else:
                if cfg.scorer == "router":
                    w = layer.scorer.weight
                    xt[0] = torch.linalg.lstsq(w, torch.full((n,), 4.0, dtype=w.dtype).unsqueeze(1)).solution[:, 0]
                else:
                    xt[0] = 0.0
                    xt[0, cfg.self_routing_offset : cfg.self_routing_offset + n] = 4.0
                xt[1] = -xt[0]
                centre = torch.zeros(n, dtype=torch.float64)
            layer.threshold_bias.copy_(centre + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64))

    return prepare


THRESHOLD_CASES = [("aoe", "l2"), ("aoe", "l1"), ("aoe", "linf"), ("router", "l2"), ("self_routing", "l2")]


@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("scorer,norm", THRESHOLD_CASES)
def test_threshold_selection_matches_reference(scorer, norm, threshold):
    # λ large enough that the balancing loss's gradient shows beside the output's; under threshold 0.3 unfired
    # experts with 0 < G <= 0.3 get a gradient through mean G, so AoE keeps its cache
    cfg = make_cfg(
        scorer, "threshold", "softmax_topk", norm, threshold=threshold, threshold_lambda_init=0.7, threshold_mu=0.3
    )
    assert cfg.unselected_get_gradient == (threshold > 0)
    masks = run_and_compare(
        cfg,
        (14,),
        _seed("threshold", scorer, norm, threshold),
        prepare=_threshold_prepare(cfg, _seed("thr", scorer, norm)),
    )
    sizes = [len(m) for m in masks]
    assert sizes[0] == cfg.num_experts and sizes[1] == 0, sizes
    assert len(set(sizes[2:])) >= 2, sizes  # the rest fire a varying number of experts


THRESHOLD_VARIANTS = [("aoe", dict(aoe_cache="recompute", threshold=0.3))]
THRESHOLD_VARIANTS += [
    (s, over) for s in SCORERS for over in (dict(balance="none"), dict(balance="none", threshold=0.3))
]


@pytest.mark.parametrize("scorer,over", THRESHOLD_VARIANTS)
def test_threshold_selection_variants_match_reference(scorer, over):
    # the recomputed AoE cache; no balancing loss (aux exactly 0, b's gradient from the outputs only)
    cfg = make_cfg(scorer, "threshold", "softmax_topk", threshold_lambda_init=0.7, **over)
    if cfg.balance == "none":
        assert not cfg.unselected_get_gradient
    run_and_compare(
        cfg,
        (3, 4),
        _seed("thr-var", scorer, tuple(sorted(over.items()))),
        prepare=_threshold_prepare(cfg, _seed("thrv", scorer)),
    )


# --------------------------------------------------------------------------------------------------------------
# The ERC loss (a learned router coupled to its experts)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_kind", ["swiglu", "factorized"])
@pytest.mark.parametrize("selection", ["top_k", "top_p"])
def test_erc_loss_matches_reference(selection, expert_kind):
    # a training layer adds erc_loss_coeff·L_ERC to its aux loss, with gradients to the router and every W_g
    cfg = make_cfg("router", selection, "softmax_topk", expert_kind=expert_kind, erc_loss_coeff=0.7, erc_alpha=0.8)
    run_and_compare(cfg, (13,), _seed("erc", selection, expert_kind))


# --------------------------------------------------------------------------------------------------------------
# Exact ties: the lower expert index first (expert choice: the lower token index), in the layer and the reference
# --------------------------------------------------------------------------------------------------------------


def _twin_prepare(cfg):
    """Experts 2j and 2j + 1 score exactly alike: AoE's Wdown_{2j+1} = −Wdown_{2j} (every norm of −C is that of C),
    the router's rows repeat, Self-Routing's channels repeat; the second half of the tokens repeats the first. The
    inputs and scorer weights are rounded to multiples of 1/64, so that every score is exact in float64 whatever
    order a kernel sums in, and twins tie exactly in the layer too."""

    def prepare(layer, x0):
        n, xt = cfg.num_experts, x0.view(-1, cfg.d_model)
        with torch.no_grad():
            x0.copy_(torch.round(x0 * 64) / 64)
            for w in layer.scorer.parameters():
                w.copy_(torch.round(w * 64) / 64)
            if cfg.scorer == "aoe":
                layer.scorer.w_down[1::2] = -layer.scorer.w_down[0::2][: n // 2]
            elif cfg.scorer == "router":
                layer.scorer.weight[1::2] = layer.scorer.weight[0::2][: n // 2]
            else:
                off = cfg.self_routing_offset
                xt[:, off + 1 : off + n : 2] = xt[:, off : off + n - 1 : 2][:, : n // 2]
            half = xt.shape[0] // 2
            xt[half : 2 * half] = xt[:half]

    return prepare


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("scorer", SCORERS)
def test_exact_ties_match_reference(scorer, selection):
    # top-3 over twin experts splits a pair at the K boundary; expert choice with capacity 3 over twin tokens takes
    # one pair and the first token of the next
    n = NUM_EXPERTS[scorer]
    cfg = make_cfg(scorer, selection, "softmax_topk", top_k=3, capacity_factor=n / 4, top_p=0.3)
    masks = run_and_compare(cfg, (12,), _seed("twins", scorer, selection), prepare=_twin_prepare(cfg), ties=True)
    if selection == "expert_choice":
        taken = [{t for t in range(12) if i in masks[t]} for i in range(n)]
        assert all(t - 6 in got for got in taken for t in got if t >= 6), taken  # a twin token only after its first
        assert all(len({t % 6 for t in got}) == 2 for got in taken), taken  # every expert split a pair of twins
    else:
        pairs = [(m, j) for m in masks for j in range(0, n - 1, 2)]
        assert all(j in m for m, j in pairs if j + 1 in m), masks  # a twin expert only after its first
        assert any(j in m and j + 1 not in m for m, j in pairs), masks  # some token split a pair of twins


# --------------------------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------------------------


def test_reference_shares_no_code_with_the_layer():
    # it imports torch, the standard library and MoEConfig only: nothing of the fast path it checks
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(reference))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "math", "dataclasses", "torch", "aoe_ep.config"}, imported


@pytest.mark.parametrize("shape", [(3, 15), (16, 3), ()])
def test_reference_rejects_inputs_of_the_wrong_width(shape):
    cfg = make_cfg("router", "top_k", "softmax_topk")
    params = dict(build_layer(cfg, 0).named_parameters())
    with pytest.raises(ValueError, match=r"^reference.forward expects x \[\.\.\., 16\], got shape"):
        reference.forward(cfg, params, torch.zeros(shape, dtype=torch.float64))
