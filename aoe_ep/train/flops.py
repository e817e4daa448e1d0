"""Model FLOPs per token and GPU peaks (`aoe_ep.hardware`), for the model-FLOPs utilisation (MFU) the trainer logs
on GPU.

Attention and head FLOPs come from `aoe_ep.model.cost`, FFN FLOPs from the layer cost model (`aoe_ep.moe.cost`); a
multiply-add counts 2 and a training step costs three forwards (backward ≈ 2× forward). Recomputation is not
counted: this is model FLOPs.
"""

from __future__ import annotations

from typing import Optional

import torch

from aoe_ep.config import Config
from aoe_ep.hardware import peak_bf16_flops
from aoe_ep.model.cost import TRAIN_FORWARDS, attention_flops, head_flops
from aoe_ep.moe.cost import dense_flops, moe_flops


def forward_flops_per_token(cfg: Config, seq_len: int) -> float:
    """Per token: QKV and output projections (8d²), causal attention scores and weighted values (2·S·d: 4·S·d
    halved by the mask), the FFN of the cost model, the output head (2·d·vocab)."""
    m = cfg.model
    ffn = moe_flops(cfg.moe) if m.ffn == "moe" else dense_flops(m.d_model, m.d_ffn)
    return m.n_layers * (attention_flops(m.d_model, seq_len) + ffn) + head_flops(m.d_model, m.vocab_size)


def train_flops_per_token(cfg: Config, seq_len: int) -> float:
    return TRAIN_FORWARDS * forward_flops_per_token(cfg, seq_len)


def peak_flops(device: torch.device, peak_tflops: float = 0.0) -> Optional[float]:
    """Peak FLOP/s of one device: `train.peak_tflops` when set, else the table; None on CPU or an unknown GPU."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))
