"""AoE upcycling: truncated SVD with the singular values split evenly, the router dropped, a run directory that
aoe-ep loads as AoE, and a per-layer report of the factorisation error."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.cli import main
from aoe_ep.eval.loading import open_checkpoint
from aoe_ep.hf.errors import ConversionError
from aoe_ep.hf.export import export_state
from aoe_ep.hf.upcycle import factorise, upcycle, upcycle_import
from tests.hf.conftest import kind_config, random_model


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


def test_upcycled_run_is_aoe_with_the_factorised_experts(tmp_path, capsys):
    cfg = kind_config("mixtral")
    model = random_model(cfg)
    export_state(cfg, model.state_dict(), tmp_path / "hf")
    rank = cfg.moe.d_ffn  # full rank: W_down·W_up = W_g, so each expert computes what it computed before
    _, report = upcycle_import(tmp_path / "hf", tmp_path / "run", rank)
    assert len(report.errors_LE) == cfg.model.n_layers and max(map(max, report.errors_LE)) < 1e-5
    with open_checkpoint(tmp_path / "run", device="cpu") as loaded:
        moe = loaded.cfg.moe
        assert (moe.scorer, moe.d_low, moe.d_wide, moe.top_k) == ("aoe", rank, cfg.moe.d_ffn, cfg.moe.top_k)
        new = loaded.model.blocks[0].ffn
        old = model.blocks[0].ffn
        x_TD = torch.randn(5, cfg.model.d_model, generator=torch.Generator().manual_seed(1))
        for e in range(cfg.moe.num_experts):
            before = (
                torch.nn.functional.silu(x_TD @ old.experts.w_gate[e]) * (x_TD @ old.experts.w_p[e])
            ) @ old.experts.w_o[e]
            gate = x_TD @ new.scorer.w_down[e] @ new.experts.w_up[e]
            after = (torch.nn.functional.silu(gate) * (x_TD @ new.experts.w_p[e])) @ new.experts.w_o[e]
            torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
        assert not any(name.endswith("scorer.weight") for name in loaded.model.state_dict())

    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "low"), "--to", "aoe", "--d-low", "4"]) == 0
    out = capsys.readouterr().out
    assert "d_low = 4" in out and "layer  1" in out


def test_lower_rank_loses_more():
    cfg = kind_config("mixtral")
    state = random_model(cfg).state_dict()
    errors = [sum(upcycle(cfg, state, rank)[2].errors_LE[0]) for rank in (2, 8, 16)]
    assert errors[0] > errors[1] > errors[2]


def test_upcycling_refuses_what_it_cannot_do(tmp_path, capsys):
    cfg = kind_config("aoe_l2")
    with pytest.raises(ConversionError, match="routed MoE with SwiGLU experts"):
        upcycle(cfg, random_model(cfg).state_dict(), 4)
    mixtral = kind_config("mixtral")
    with pytest.raises(ConversionError, match="--d-low 99"):
        upcycle(mixtral, random_model(mixtral).state_dict(), 99)
    export_state(mixtral, random_model(mixtral).state_dict(), tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "run"), "--to", "aoe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--d-low" in err[0]
    assert not (tmp_path / "run").exists()
