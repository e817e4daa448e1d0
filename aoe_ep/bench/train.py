"""`aoe-ep bench train`: the levers of a large run side by side, forward+backward of whole decoders.

Per model (the tiny preset, and 4-layer slices of the 732M AoE and routed-MoE shapes) four contenders share one set
of weights: no activation checkpointing, `selective`, `full` (eager), and `compiled` (train.compile, no
checkpointing). Each is timed in interleaved rounds (`aoe_ep.bench.measure`); a ratio is the median over rounds of
the ratio within a round, which a shared machine's drift spares. Memory is what a forward keeps for backward
(`kept_bytes_counter`: autograd's saved tensors and what checkpointing holds itself), parameters excluded; the
compiled contender's is that of its eager twin, since compiled code does not run under the recorder. On CUDA also
the allocator's peak over one forward+backward (`torch.cuda.max_memory_allocated`, above what was allocated before
it). `bench_model` takes the device, the compute dtype (bf16 runs under autocast, as `train.precision: bf16` does)
and the micro-batch shape, which `aoe_ep.bench.gpu_check` sets for one GPU.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from aoe_ep.bench.measure import interleaved_samples, kept_bytes_counter, paired_speedup, synchronize
from aoe_ep.config import Config, load_config
from aoe_ep.model import Decoder, token_cross_entropy
from aoe_ep.train.activation_checkpoint import apply_activation_checkpointing
from aoe_ep.train.compile import compile_blocks
from aoe_ep.train.validation import autocast

MODELS = {
    "tiny (AoE)": ("tiny", []),
    "732M slice, AoE": ("paper/aoe_732m", ["model.n_layers=4"]),
    "732M slice, MoE": ("paper/moe_732m", ["model.n_layers=4"]),
}
CONTENDERS = ("none", "selective", "full", "compiled")
# (sequences, tokens per sequence) of one micro-batch per model: the tiny preset's own; one 512-token sequence for
# the slices, which a 2-core CPU runs in seconds
SHAPES = {"tiny (AoE)": (16, 128), "732M slice, AoE": (1, 512), "732M slice, MoE": (1, 512)}


@dataclass(frozen=True)
class Row:
    model: str
    contender: str
    tokens_per_s: float
    kept_bytes: int
    speed_vs_none: float  # median per-round ratio of tokens/s against `none`
    speed_range: tuple[float, float]
    memory_vs_none: float
    peak_bytes: Optional[int] = None  # CUDA only: the allocator's peak over one step, above what was allocated before


def _config(name: str, batch: int, seq: int) -> Config:
    preset, overrides = MODELS[name]
    return load_config(
        preset,
        overrides + [f"data.seq_len={seq}", f"model.max_seq_len={max(seq, 16)}", f"train.micro_batch_size={batch}"],
    )


def _contender(base: Decoder, kind: str, device: torch.device) -> Decoder:
    model = copy.deepcopy(base)
    if kind == "compiled":
        compile_blocks(model, device)
    else:
        apply_activation_checkpointing(model, kind)
    return model.train()


def _autocast_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """The autocast dtype of a compute dtype: None for fp32 (no autocast)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: must be torch.float32 or torch.bfloat16, got {dtype}")
    return None if dtype == torch.float32 else dtype


def _loss(model: Decoder, tokens_BS: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The training loss of one micro-batch, its forward under autocast to `dtype` (None: fp32)."""
    with autocast(dtype, tokens_BS.device):
        out = model(tokens_BS)
        ce_sum, count = token_cross_entropy(
            out.logits, tokens_BS.roll(-1, 1), torch.ones_like(tokens_BS, dtype=torch.float32)
        )
        return ce_sum / count + out.aux_loss


def _step(model: Decoder, tokens_BS: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    def step() -> None:
        _loss(model, tokens_BS, dtype).backward()
        for p in model.parameters():
            p.grad = None

    return step


def _kept(model: Decoder, tokens_BS: torch.Tensor, dtype: Optional[torch.dtype] = None) -> int:
    with kept_bytes_counter(exclude=list(model.parameters())) as kept:
        loss = _loss(model, tokens_BS, dtype)
    measured = kept()
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return measured


def _peak(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """The CUDA allocator's peak over one call of `step`, above what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def bench_model(
    name: str,
    rounds: int,
    device: torch.device,
    contenders=CONTENDERS,
    progress=None,
    dtype: torch.dtype = torch.float32,
    shape: Optional[tuple[int, int]] = None,
) -> list[Row]:
    """The contenders of model `name` side by side on `device`, computing in `dtype` (fp32, or bf16 under
    autocast), on micro-batches of `shape` (sequences, tokens per sequence; default `SHAPES[name]`)."""
    amp = _autocast_dtype(dtype)
    if "none" not in contenders:
        raise ValueError(f"contenders: must include 'none', the reference of the ratios, got {tuple(contenders)}")
    batch, seq = shape or SHAPES[name]
    cfg = _config(name, batch, seq)
    torch.manual_seed(0)
    with torch.device(device):
        base = Decoder(cfg.model, cfg.moe)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq), device=device)
    models = {kind: _contender(base, kind, device) for kind in contenders}
    # A compiled module runs eagerly from its first call under a dispatch mode on (torch.compile skips the frame and
    # remembers it), and the kept-bytes counter is one: `compiled` is counted on an eager twin, which keeps what `none`
    # keeps, and never called under the counter. Its compiled memory shows in the CUDA peak.
    kept = {
        kind: _kept(_contender(base, "none", device) if kind == "compiled" else models[kind], tokens, amp)
        for kind in contenders
    }
    del base
    steps = {kind: _step(models[kind], tokens, amp) for kind in contenders}
    for step in steps.values():
        step()  # warm-up: the compiled ones compile here
    peak = {kind: _peak(step, device) for kind, step in steps.items()}  # of a warm step
    samples = interleaved_samples(steps, iters=1, rounds=rounds, device=device, progress=progress)
    rows = []
    for kind in contenders:
        ratio, low, high = paired_speedup(samples, kind, "none")
        rows.append(
            Row(
                model=name,
                contender=kind,
                tokens_per_s=batch * seq / statistics.median(samples[kind]),
                kept_bytes=kept[kind],
                speed_vs_none=ratio,
                speed_range=(low, high),
                memory_vs_none=kept[kind] / kept["none"],
                peak_bytes=peak[kind],
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table; a "peak MiB" column where any row has a CUDA peak."""
    peaks = any(r.peak_bytes is not None for r in rows)
    head = ("model", "contender", "tokens/s", "kept MiB", "memory / none", "speed / none", "round range")
    head += ("peak MiB",) if peaks else ()
    lines = [
        (
            r.model,
            r.contender,
            f"{r.tokens_per_s:,.0f}",
            f"{r.kept_bytes / 2**20:,.1f}",
            f"{r.memory_vs_none:.2f}",
            f"{r.speed_vs_none:.2f}",
            f"{r.speed_range[0]:.2f}-{r.speed_range[1]:.2f}",
        )
        + ((f"{r.peak_bytes / 2**20:,.1f}" if r.peak_bytes is not None else "-",) if peaks else ())
        for r in rows
    ]
    widths = [max(len(x[i]) for x in lines + [head]) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths)))
        for x in [head] + lines
    )


def main(models: Optional[list[str]], rounds: int, device: str, out: Optional[str]) -> list[Row]:
    names = models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--models: {unknown[0]!r} is not one of {', '.join(map(repr, MODELS))}")
    if rounds < 1:
        raise ValueError(f"--rounds: must be a positive integer, got {rounds}")
    dev = torch.device(device)
    rows = []
    for name in names:
        rows += bench_model(name, rounds, dev)
        print(table([r for r in rows if r.model == name]), flush=True)
    print(
        f"\naoe-ep bench train on {dev.type} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), fp32, {rounds} interleaved rounds"
    )
    print(table(rows))
    if out:
        with open(out, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)
    return rows
