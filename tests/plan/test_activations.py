"""The plan's activation bytes against what autograd really saves (`saved_bytes_counter`: every tensor kept for
backward, parameters excluded) for one micro-batch of small dense, routed-MoE and AoE decoders, fp32 and bf16."""

from __future__ import annotations

import contextlib

import pytest
import torch

from aoe_ep.bench.measure import saved_bytes_counter
from aoe_ep.config import load_config
from aoe_ep.model import Decoder, token_cross_entropy
from aoe_ep.plan.activations import MicroBatch, activation_bytes, routed_rows

SMALL = [
    "model.n_layers=2",
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
MODELS = {
    "dense": ["model.ffn=dense"],
    "router": ["moe.scorer=router"],
    "router_factorized": ["moe.scorer=router", "moe.expert_kind=factorized"],
    "self_routing": ["moe.scorer=self_routing", "moe.aux_loss_coeff=0"],
    "aoe": ["moe.scorer=aoe"],  # moe.aoe_cache=keep: the whole cache
    "aoe_recompute": ["moe.scorer=aoe", "moe.aoe_cache=recompute"],
    "aoe_selected_rows": ["moe.scorer=aoe", "moe.aux_loss_coeff=0"],  # only the selected rows
    "aoe_expert_choice": ["moe.scorer=aoe", "moe.selection=expert_choice", "moe.aux_loss_coeff=0"],
    "aoe_softmax_all": ["moe.scorer=aoe", "moe.gate=softmax_all", "moe.aux_loss_coeff=0"],
}


def _measured(cfg, batch: int, autocast: bool) -> int:
    torch.manual_seed(0)
    model = Decoder(cfg.model, cfg.moe)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
    labels = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
    mask = torch.ones(batch, cfg.data.seq_len)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with saved_bytes_counter(exclude=list(model.parameters())) as saved, ctx:
        out = model(tokens)  # the trainer's loss: token-mean cross-entropy plus the layers' aux losses
        ce_sum, count = token_cross_entropy(out.logits, labels, mask)
        loss = ce_sum / count + out.aux_loss
    loss.backward()
    return saved[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_activation_bytes_match_the_saved_tensors(model, precision):
    cfg = load_config("tiny", SMALL + MODELS[model] + [f"train.precision={precision}"])
    batch, autocast = 4, precision == "bf16"
    mb = MicroBatch(
        batch=batch, seq_len=cfg.data.seq_len, compute_bytes=2 if autocast else 4, autocast=autocast, device="cpu"
    )
    rows = routed_rows(cfg.moe, mb.tokens) if cfg.model.ffn == "moe" else 0
    planned = sum(activation_bytes(cfg, mb, ep=1, expert_rows=rows).values())
    measured = _measured(cfg, batch, autocast)
    assert planned == pytest.approx(measured, rel=0.10), f"planned {planned:,.0f} vs saved {measured:,}"
