"""Model FLOPs per token and GPU peaks, for the model-FLOPs utilisation (MFU) the trainer logs on GPU.

FFN FLOPs come from the layer cost model (`aoe_ep.moe.cost`, DESIGN.md section 6); a multiply-add counts 2 and a
training step costs three forwards (backward ≈ 2× forward). Recomputation is not counted: this is model FLOPs.
"""

from __future__ import annotations

from typing import Optional

import torch

from aoe_ep.config import Config
from aoe_ep.moe.cost import dense_flops, moe_flops

# Dense bf16 tensor-core peaks (no sparsity), per GPU; matched in order against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
    ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12),
)


def forward_flops_per_token(cfg: Config, seq_len: int) -> float:
    """Per token: QKV and output projections (8d²), causal attention scores and weighted values (2·S·d: 4·S·d
    halved by the mask), the FFN of the cost model, the output head (2·d·vocab)."""
    m = cfg.model
    attention = 8.0 * m.d_model * m.d_model + 2.0 * seq_len * m.d_model
    ffn = moe_flops(cfg.moe) if m.ffn == "moe" else dense_flops(m.d_model, m.d_ffn)
    return m.n_layers * (attention + ffn) + 2.0 * m.d_model * m.vocab_size


def train_flops_per_token(cfg: Config, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def peak_flops(device: torch.device, peak_tflops: float = 0.0) -> Optional[float]:
    """Peak FLOP/s of one device: `train.peak_tflops` when set, else the table; None on CPU or an unknown GPU."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)
