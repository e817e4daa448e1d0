"""The grouped products and the grouped expert Function against per-expert loops: empty, single-row and uneven
groups, both kernels, the padding of a misaligned hidden width, and an expanded output gradient."""

import pytest
import torch
import torch.nn.functional as F

from aoe_ep.moe.experts import grouped_glu
from aoe_ep.moe.grouped import Groups, choose_kernel, gmm, gmm_wgrad, pad_to

COUNTS = [[3, 0, 5, 1], [0, 0, 0, 4], [1, 1, 1, 1], [0, 0, 0, 0], [7]]


def _groups(counts):
    return Groups(torch.tensor(counts, dtype=torch.int64))


def _loop_gmm(a, w, counts):
    outs = [x @ w[e] for e, x in enumerate(torch.split(a, counts))]
    return torch.cat(outs) if outs else a.new_zeros(0, w.shape[2])


@pytest.mark.parametrize("counts", COUNTS, ids=str)
@pytest.mark.parametrize(
    "kernel,dtype",
    [("grouped", torch.float32), ("loop", torch.float32), ("loop", torch.float64), ("grouped", torch.bfloat16)],
)
def test_products_match_a_per_expert_loop(counts, kernel, dtype):
    gen = torch.Generator().manual_seed(sum(counts) + len(counts))
    m, k, n = sum(counts), 8, 16
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(m, n, generator=gen).to(dtype)
    w = torch.randn(len(counts), k, n, generator=gen).to(dtype)
    groups = _groups(counts)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(gmm(a, w, groups, kernel), _loop_gmm(a, w, counts), **tol)
    torch.testing.assert_close(
        gmm(b, w.transpose(1, 2), groups, kernel), _loop_gmm(b, w.transpose(1, 2), counts), **tol
    )
    want = torch.stack([x.t() @ y for x, y in zip(torch.split(a, counts), torch.split(b, counts))])
    torch.testing.assert_close(gmm_wgrad(a, b, groups, kernel), want, **tol)


def _glu_reference(x, w_gate, w_p, w_o, counts):
    outs = []
    for e, xe in enumerate(torch.split(x, counts)):
        outs.append((F.silu(xe @ w_gate[e]) * (xe @ w_p[e])) @ w_o[e])
    return torch.cat(outs)


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 1, 0, 0], [2, 2, 2, 2]], ids=str)
def test_grouped_glu_values_and_gradients(kernel, counts):
    gen = torch.Generator().manual_seed(7)
    d, f = 8, 12
    x0 = torch.randn(sum(counts), d, generator=gen)
    ws0 = [
        torch.randn(len(counts), d, f, generator=gen),
        torch.randn(len(counts), d, f, generator=gen),
        torch.randn(len(counts), f, d, generator=gen),
    ]
    x, ws = x0.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws0]
    y = grouped_glu(x, x, *ws, _groups(counts), kernel)
    y.sum().backward()  # an expanded (zero-stride) output gradient
    x_ref, ws_ref = x0.double().requires_grad_(), [w.double().requires_grad_() for w in ws0]
    y_ref = _glu_reference(x_ref, *ws_ref, counts)
    y_ref.sum().backward()
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip([x] + ws, [x_ref] + ws_ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_misaligned_hidden_width_is_padded_without_changing_results():
    # bf16 rows of 7 elements are 14 bytes: the grouped kernel needs 16, so the hidden width is padded to 8
    assert (
        pad_to(7, torch.bfloat16) == 8 and pad_to(6470, torch.bfloat16) == 6472 and pad_to(6470, torch.float32) == 6472
    )
    gen = torch.Generator().manual_seed(3)
    counts, d, f = [4, 0, 3], 16, 7
    x0 = torch.randn(sum(counts), d, generator=gen).bfloat16()
    ws0 = [
        torch.randn(3, d, f, generator=gen).bfloat16(),
        torch.randn(3, d, f, generator=gen).bfloat16(),
        torch.randn(3, f, d, generator=gen).bfloat16(),
    ]
    results = {}
    for kernel in ("grouped", "loop"):
        x, ws = x0.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws0]
        y = grouped_glu(x, x, *ws, _groups(counts), kernel)
        (y.float() * torch.arange(y.numel()).view_as(y).float().sin()).sum().backward()
        results[kernel] = [y] + [t.grad for t in [x] + ws]
        assert all(t.grad.shape == t.shape for t in ws)
    for got, want in zip(results["grouped"], results["loop"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_kernel_choice():
    cpu = torch.device("cpu")
    assert choose_kernel("auto", cpu, torch.float64) == "loop"
    assert choose_kernel("grouped", cpu, torch.float64) == "loop"  # no float64 grouped kernel
    assert choose_kernel("auto", cpu, torch.float32, widths=(6,)) == "loop"  # 24-byte rows
    assert choose_kernel("auto", cpu, torch.float32, widths=(8,), rows_per_group=512) == "loop"
    assert choose_kernel("auto", cpu, torch.float32, widths=(8,), rows_per_group=96) == "grouped"
    assert choose_kernel("grouped", cpu, torch.float32, widths=(8,)) == "grouped"
    assert choose_kernel("loop", cpu, torch.float32, widths=(8,)) == "loop"
    assert choose_kernel("auto", torch.device("meta"), torch.bfloat16, widths=(8,)) == "grouped"
    assert choose_kernel("auto", torch.device("meta"), torch.float32, widths=(8,)) == "loop"
    with pytest.raises(ValueError, match="expert kernel"):
        choose_kernel("fast", cpu, torch.float32)


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 1, 0, 0], [6, 2, 9, 2]], ids=str)
@pytest.mark.parametrize("gate_input", ["x", "cache"])
def test_recomputed_pre_activations_give_identical_results(kernel, counts, gate_input):
    """`recompute=True` keeps the rows only and computes g Wg and x Wp again in backward: the same output and the
    same gradients, bit for bit, and no [M, W] tensor saved."""
    gen = torch.Generator().manual_seed(11)
    m, d, low, f = sum(counts), 16, 8, 12
    x0 = torch.randn(m, d, generator=gen)
    g0 = torch.randn(m, low, generator=gen)
    ws0 = [
        torch.randn(len(counts), d if gate_input == "x" else low, f, generator=gen),
        torch.randn(len(counts), d, f, generator=gen),
        torch.randn(len(counts), f, d, generator=gen),
    ]
    dy = torch.randn(m, d, generator=gen)
    results = {}
    for recompute in (False, True):
        x, g = x0.clone().requires_grad_(), g0.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in ws0]
        saved = []

        def pack(t, saved=saved):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = grouped_glu(x, x if gate_input == "x" else g, *ws, _groups(counts), kernel, recompute=recompute)
        y.backward(dy)
        results[recompute] = [y.detach(), x.grad] + [w.grad for w in ws] + ([g.grad] if gate_input == "cache" else [])
        assert ((m, f) in saved) == (not recompute and m > 0), saved
    for got, want in zip(results[True], results[False], strict=True):
        assert torch.equal(got, want)
