"""The unpermute's row sum: the values and gradients of autograd's `index_add`, without keeping its source."""

import torch

from aoe_ep.moe.routing import sum_rows, weighted_sum


def _saved_shapes(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = fn()
    return out, saved


def test_sum_rows_equals_index_add_and_keeps_only_the_index():
    gen = torch.Generator().manual_seed(5)
    index_M = torch.tensor([4, 0, 4, 2, 0, 4, 1])  # token 3 and 5 get no row
    rows0 = torch.randn(7, 6, generator=gen)
    dy = torch.randn(6, 6, generator=gen)
    rows, plain = rows0.clone().requires_grad_(), rows0.clone().requires_grad_()
    y, saved = _saved_shapes(lambda: sum_rows(rows, index_M, 6))
    want = plain.new_zeros(6, 6).index_add(0, index_M, plain)
    assert torch.equal(y, want) and saved == [(7,)]
    y.backward(dy)
    want.backward(dy)
    assert torch.equal(rows.grad, plain.grad)
    assert torch.equal(sum_rows(rows0[:0], index_M[:0], 3), torch.zeros(3, 6))


def test_weighted_sum_gradients_are_those_of_the_plain_formula():
    gen = torch.Generator().manual_seed(6)
    index_M = torch.tensor([0, 1, 1, 3, 0])
    out0, gate0 = torch.randn(5, 4, generator=gen), torch.rand(5, generator=gen)
    dy = torch.randn(4, 4, generator=gen)
    out, gate = out0.clone().requires_grad_(), gate0.clone().requires_grad_()
    y, saved = _saved_shapes(lambda: weighted_sum(out, gate, index_M, 4))
    assert (5, 4) in saved and saved.count((5, 4)) == 1  # the expert outputs (the gates' gradient), nothing else
    y.backward(dy)
    out_ref, gate_ref = out0.clone().requires_grad_(), gate0.clone().requires_grad_()
    want = out_ref.new_zeros(4, 4).index_add(0, index_M, out_ref * gate_ref.unsqueeze(1))
    want.backward(dy)
    assert torch.equal(y, want.detach())
    assert torch.equal(out.grad, out_ref.grad) and torch.equal(gate.grad, gate_ref.grad)
