"""The plan's saved activations per activation-checkpointing mode against what the model keeps
(`kept_bytes_counter`: autograd's saved tensors plus what checkpointing holds itself), on small decoders and on a
4-layer slice of the 732M shapes (AoE and routed MoE), fp32 on the CPU; and the FLOPs each mode adds."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from aoe_ep.bench.measure import kept_bytes_counter
from aoe_ep.config import ConfigError, load_config
from aoe_ep.model import Decoder, token_cross_entropy
from aoe_ep.plan.activations import MicroBatch, activation_bytes, routed_rows
from aoe_ep.plan.recompute import checkpointed_bytes
from aoe_ep.plan.report import choose_levers, plan_all
from aoe_ep.train.activation_checkpoint import apply_activation_checkpointing

SMALL = [
    "model.n_layers=3",
    "model.d_model=32",
    "model.n_heads=2",
    "model.vocab_size=96",
    "model.max_seq_len=32",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.d_ffn=48",
    "moe.d_low=8",
    "model.d_ffn=64",
    "data.seq_len=32",
]
SLICE = ["model.n_layers=4", "data.seq_len=64", "model.max_seq_len=64"]  # the 732M shapes, 4 layers


def _kept(cfg, mode: str, every: int, batch: int, autocast: bool, built=None) -> int:
    """What the model (a copy of `built`, or a new one) keeps of one micro-batch under `mode`."""
    torch.manual_seed(0)
    model = copy.deepcopy(built) if built is not None else Decoder(cfg.model, cfg.moe)
    apply_activation_checkpointing(model, mode, every)
    seq = cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with kept_bytes_counter(exclude=list(model.parameters())) as kept, ctx:
        out = model(tokens)
        ce_sum, count = token_cross_entropy(out.logits, tokens, torch.ones(batch, seq))
        loss = ce_sum / count + out.aux_loss
        del out
    measured = kept()
    del loss
    return measured


def _planned(cfg, mode: str, every: int, batch: int, autocast: bool) -> float:
    mb = MicroBatch(
        batch=batch, seq_len=cfg.data.seq_len, compute_bytes=2 if autocast else 4, autocast=autocast, device="cpu"
    )
    rows = routed_rows(cfg.moe, mb.tokens) if cfg.model.ffn == "moe" else 0
    return sum(checkpointed_bytes(cfg, mb, activation_bytes(cfg, mb, ep=1, expert_rows=rows), mode, every).values())


@pytest.mark.parametrize(
    "model, precision",
    [
        (["model.ffn=dense"], "fp32"),
        (["moe.scorer=router"], "fp32"),
        (["moe.scorer=aoe"], "fp32"),
        (["moe.scorer=aoe"], "bf16"),
    ],
)
def test_small_models_per_mode(model, precision):
    cfg = load_config("tiny", SMALL + model)
    autocast = precision == "bf16"
    for mode in ("none", "selective", "full"):
        for every in (1, 2) if mode != "none" and not autocast else (1,):
            planned, measured = _planned(cfg, mode, every, 4, autocast), _kept(cfg, mode, every, 4, autocast)
            assert planned == pytest.approx(measured, rel=0.10), f"{mode}/{every}: {planned:,.0f} vs {measured:,}"


@pytest.mark.parametrize("preset", ["paper/aoe_732m", "paper/moe_732m"])
def test_732m_slice_per_mode(preset):
    cfg = load_config(preset, SLICE)
    with torch.device("cpu"):
        built = Decoder(cfg.model, cfg.moe)
    kept = {}
    for mode in ("none", "selective", "full"):
        planned, kept[mode] = _planned(cfg, mode, 1, 1, False), _kept(cfg, mode, 1, 1, False, built)
        assert planned == pytest.approx(kept[mode], rel=0.10), f"{mode}: {planned:,.0f} vs {kept[mode]:,}"
    assert kept["full"] < kept["selective"] < kept["none"]
    # the experts' pre-activations are the bulk of an MoE layer: selective keeps about half of none
    assert kept["selective"] <= 0.6 * kept["none"], (kept["selective"], kept["none"])


def test_checkpointing_lowers_memory_and_adds_recompute():
    cfg = load_config("paper/aoe_4b", ["data.seq_len=8192", "model.max_seq_len=8192"])
    plans = {mode: plan_all(cfg, ep=8, dp=1, micro_batch=2, ac=mode)[0] for mode in ("none", "selective", "full")}
    assert plans["full"].bytes_activations < plans["selective"].bytes_activations < plans["none"].bytes_activations
    assert "recompute" not in plans["none"].flops
    # selective runs the experts' gate and up products again: 2·W·(d_low + d) of the 2·W·(d_low + 2d) per row
    moe = cfg.moe
    share = (moe.d_low + moe.d_model) / (moe.d_low + 2 * moe.d_model)
    assert plans["selective"].flops["recompute"] == pytest.approx(share * plans["none"].flops["experts"] / 3)
    assert plans["selective"].flops["recompute"] < plans["full"].flops["recompute"]
    assert plans["full"].flops["recompute"] > 0.2 * plans["none"].flops_per_step
    assert plans["full"].max_micro_batch > plans["none"].max_micro_batch
    assert plans["full"].step_seconds["total"] > plans["none"].step_seconds["total"]
    chosen = choose_levers(cfg, 8, 1)
    assert chosen.fits and chosen.micro_batch == plans[chosen.activation_checkpointing].max_micro_batch
    # 65,536-token sequences: one does not fit without recomputation, so the choice is `full`
    long = load_config("paper/aoe_4b", ["data.seq_len=65536", "model.max_seq_len=65536"])
    assert plan_all(long, ep=8, dp=1, micro_batch=1, ac="none")[0].max_micro_batch == 0
    chosen = choose_levers(long, 8, 1, gpu="h100")
    assert (chosen.activation_checkpointing, chosen.fits) == ("full", True) and chosen.micro_batch >= 1


def test_bad_ac_values():
    cfg = load_config("tiny")
    with pytest.raises(ConfigError, match="^--ac:"):
        plan_all(cfg, ep=1, dp=1, ac="partial")
    with pytest.raises(ConfigError, match="^--ac auto"):
        plan_all(cfg, ep=1, dp=1, micro_batch=2, ac="auto")
