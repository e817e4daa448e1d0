"""The rank-R factorisation of a gate projection: truncated SVD with the singular values split evenly."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.model.lowrank import factorise


def test_factorise_splits_the_singular_values_evenly():
    w_DF = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    s_J = torch.linalg.svdvals(w_DF.double())
    for rank in (3, 7):
        down_DR, up_RF, error, energy = factorise(w_DF, rank)
        assert down_DR.shape == (12, rank) and up_RF.shape == (rank, 20)
        gram = torch.diag(s_J[:rank]).float()
        torch.testing.assert_close(down_DR.t() @ down_DR, gram, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(up_RF @ up_RF.t(), gram, rtol=1e-5, atol=1e-5)
        assert error == pytest.approx(float((s_J[rank:] ** 2).sum().sqrt() / (s_J**2).sum().sqrt()), rel=1e-6)
        assert energy == pytest.approx(float((s_J[:rank] ** 2).sum() / (s_J**2).sum()), rel=1e-9)
    down_DR, up_RF, error, _ = factorise(w_DF, 12)
    torch.testing.assert_close(down_DR @ up_RF, w_DF, rtol=1e-5, atol=1e-5)
    assert error < 1e-6


def test_factorise_refuses_a_rank_the_matrix_does_not_have():
    w_DF = torch.randn(6, 9)
    for rank in (0, 7):
        with pytest.raises(ValueError, match=f"rank {rank}: must lie in \\[1, 6\\]"):
            factorise(w_DF, rank)
