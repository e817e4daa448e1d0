"""Named hardware constants (vendor datasheet figures): the GPUs the planner's step-time estimate and memory check
model, and the bf16 peaks the trainer's model-FLOPs utilisation divides by.

Peaks are dense (no sparsity). NVLink is the per-direction bandwidth of one GPU; the NIC is one per GPU. 8 GPUs per
node. Memory is what `nvidia-smi` reports for the board, of which `USABLE_FRACTION` is taken as available to the
caching allocator (CUDA context, NCCL buffers and fragmentation take the rest).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

GPUS_PER_NODE = 8
USABLE_FRACTION = 0.92
MIB = 2**20


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s
    fp32_flops: float  # fp32 (no TF32) peak, FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: int
    nvlink_bytes_per_s: float
    nic_bytes_per_s: float

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes * USABLE_FRACTION


H100 = GPU(
    "H100 SXM 80GB",
    bf16_flops=989e12,
    fp32_flops=67e12,
    hbm_bytes_per_s=3.35e12,
    memory_bytes=81559 * MIB,
    nvlink_bytes_per_s=450e9,
    nic_bytes_per_s=400e9 / 8,
)
GPUS = {
    "h100": H100,
    # the H100's compute and links, with HBM3e: more memory and bandwidth
    "h200": dataclasses.replace(H100, name="H200 SXM 141GB", hbm_bytes_per_s=4.8e12, memory_bytes=143771 * MIB),
    "a100": GPU(
        "A100 SXM 80GB",
        bf16_flops=312e12,
        fp32_flops=19.5e12,
        hbm_bytes_per_s=2.0e12,
        memory_bytes=81920 * MIB,
        nvlink_bytes_per_s=300e9,
        nic_bytes_per_s=200e9 / 8,
    ),
}

# Dense bf16 tensor-core peaks by device name, matched in order against torch.cuda.get_device_name() (so "H100 PCIe"
# before "H100"); the GPUs modelled above take their figure from `GPUS`.
PEAK_BF16_FLOPS = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", GPUS["h200"].bf16_flops),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", GPUS["h100"].bf16_flops),
    ("H800", 989e12),
    ("A100", GPUS["a100"].bf16_flops),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
)


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """The dense bf16 peak FLOP/s of the device `device_name` names, None for a device not in the table."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def assumptions(gpu: GPU) -> str:
    """The lines printed under the plan's table."""
    return "\n".join(
        [
            f"{gpu.name}: {gpu.bf16_flops / 1e12:,.0f} TFLOP/s bf16 dense ({gpu.fp32_flops / 1e12:,.1f} fp32), "
            f"{gpu.hbm_bytes_per_s / 1e12:.2f} TB/s HBM, {gpu.memory_bytes / 2**30:.1f} GiB of which "
            f"{USABLE_FRACTION:.0%} usable, NVLink {gpu.nvlink_bytes_per_s / 1e9:,.0f} GB/s per direction, one "
            f"{gpu.nic_bytes_per_s * 8 / 1e9:,.0f} Gb/s NIC per GPU, {GPUS_PER_NODE} GPUs per node.",
            "Ranks are placed EP-inner: an EP group of <= 8 stays in a node (NVLink); a data-parallel group spanning "
            "nodes runs at the NIC's rate. Collectives are ring-style (an all-reduce sends 2(N-1)/N of the buffer).",
            "Step time = compute at peak + memory traffic (saved activations written and read back, gradient "
            "accumulation, the AdamW update) at HBM bandwidth + communication; nothing overlaps, no recomputation, "
            "so it is a pessimistic bound on the parts and an optimistic one on the kernels (peak FLOP/s).",
            "State: fp32 master weights and gradients, AdamW's two fp32 moments; bf16 autocast saves bf16 "
            "activations and bf16 weight copies; EP rows travel in the compute dtype.",
        ]
    )
