"""AoE upcycling: truncated SVD with the singular values split evenly (tests/model/test_lowrank.py), the router
dropped, a run directory that aoe-ep loads as AoE, a per-layer report of the factorisation error, and a model that
computes what `aoe-ep router-free --d-low R --node xWdown` computes on the original."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.cli import main
from aoe_ep.eval.loading import open_checkpoint
from aoe_ep.hf.errors import ConversionError
from aoe_ep.hf.export import export_state
from aoe_ep.hf.upcycle import upcycle, upcycle_import
from tests.hf.conftest import kind_config, random_model


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


@torch.no_grad()
def test_upcycled_model_is_router_free_selection_at_the_same_rank(tmp_path):
    """Below full rank, the imported AoE run's logits are the original Mixtral's with every MoE block replaced by
    router-free selection at `xWdown` with the same d_low (scores ‖x W_down‖, top-K, softmax gates over the chosen
    norms, experts on W_down W_up), and not those at another rank: the run's d_low, selection and gates are the
    factors' of that rank."""
    transformers = pytest.importorskip("transformers")
    from aoe_ep.analysis.router_free import RouterFreeMoE, moe_blocks

    cfg = kind_config("mixtral")
    export_state(cfg, random_model(cfg, seed=3).state_dict(), tmp_path / "hf")
    hf = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    originals = [layer.mlp for layer, _ in moe_blocks(hf)]
    ids_BS = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))

    def router_free_logits(rank: int) -> torch.Tensor:
        for layer, block in zip(hf.model.layers, originals):
            layer.mlp = RouterFreeMoE(block, "xWdown", "l2", "softmax", d_low=rank)
        return hf(input_ids=ids_BS).logits

    for rank in (3, 5):
        upcycle_import(tmp_path / "hf", tmp_path / f"run{rank}", rank)
        with open_checkpoint(tmp_path / f"run{rank}", device="cpu") as loaded:
            assert loaded.cfg.moe.d_low == rank
            got = loaded.model(ids_BS).logits
        torch.testing.assert_close(got, router_free_logits(rank), rtol=1e-4, atol=1e-5)
        other = router_free_logits(8 - rank)
        assert (got - other).abs().max() > 1e-3
