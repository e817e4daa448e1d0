"""Named fields packed into one tensor for a collective and read back by name."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.packing import PackedLayout, pack
from aoe_ep.train.guards import StepHealth, health_packing


def test_fields_come_back_by_name():
    counts = torch.tensor([3, 0, 5])
    packed, layout = pack({"counts": counts, "entropy": torch.tensor(1.5), "tokens": torch.tensor(8)})
    assert packed.dtype == torch.float64
    assert packed.tolist() == [3.0, 0.0, 5.0, 1.5, 8.0]
    assert layout == PackedLayout(("counts", "entropy", "tokens"), (3, None, None))
    back = layout.unpack(packed * 2)  # what a sum over two equal ranks returns
    assert back["counts"].tolist() == [6.0, 0.0, 10.0]
    assert back["entropy"].shape == () and float(back["entropy"]) == 3.0
    assert float(back["tokens"]) == 16.0


def test_rows_share_leading_dimensions():
    a_LE = torch.arange(6.0).view(2, 3)
    b_L = torch.tensor([10.0, 20.0])
    packed, layout = pack({"a": a_LE, "b": b_L}, batch_dims=1)
    assert packed.shape == (2, 4)
    back = layout.unpack(packed)
    assert torch.equal(back["a"], a_LE.double()) and torch.equal(back["b"], b_L.double())


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="field 'b'"):
        pack({"a": torch.zeros(2, 3), "b": torch.zeros(3)}, batch_dims=1)
    with pytest.raises(ValueError, match="at least one field"):
        pack({})
    _, layout = pack({"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="3 slots"):
        layout.unpack(torch.zeros(4))


def test_step_health_is_read_back_with_its_layout():
    health = StepHealth(num_layers=2, device=torch.device("cpu"))
    health.nonfinite_inputs_L += torch.tensor([0.0, 4.0])
    health.bad_stats_L += torch.tensor([1.0, 0.0])
    packed = health.packed(torch.tensor([2.5, 0.25]), float("inf"))
    fields = health_packing(2).unpack(packed)
    assert float(fields["loss"]) == 2.5 and float(fields["aux_loss"]) == 0.25
    assert float(fields["grad_norm_bad"]) == 1.0
    assert fields["nonfinite_inputs"].tolist() == [0.0, 4.0] and fields["bad_stats"].tolist() == [1.0, 0.0]
