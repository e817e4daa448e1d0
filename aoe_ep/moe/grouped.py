"""Grouped matrix products over rows already grouped per expert: the three products an expert projection needs.

Rows `a_MI` are grouped expert-major: the first `counts[0]` rows belong to expert 0, and so on; `w_EIN` is the
stack of the experts' weights. No autograd here: the expert and scorer `autograd.Function`s call these in their
forward and backward, so that one weight gradient is written per projection (no per-expert `unbind`/`cat`).

Two kernels, chosen per device, dtype and shape by `choose_kernel`:
- `grouped`: `torch._grouped_mm` (CUTLASS on Hopper; a per-group loop inside ATen on CPU). Group offsets stay on
  the device, so it needs no host synchronisation. It has no float64 kernel and wants 16-byte-aligned strides;
  `pad_to` gives the width to pad a misaligned hidden dimension to (zeros, so results never change).
- `loop`: one `torch.mm` per expert into slices of one output, the obvious implementation done without copies.
  It reads the row counts on the host (free on CPU, a synchronisation on an accelerator) and runs in any dtype.
  The expert Function (`experts.py`) runs its whole chain expert by expert under this kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch

from aoe_ep.config import EXPERT_KERNELS


@dataclass
class Groups:
    """Row counts of each expert's group: `counts_E` (int64, on the rows' device) and what the kernels derive
    from it, each made once: `offsets_E` (int32 cumulative ends, for `torch._grouped_mm`) and `host` (a list)."""

    counts_E: torch.Tensor
    _offsets: Optional[torch.Tensor] = field(default=None, repr=False)
    _host: Optional[list[int]] = field(default=None, repr=False)

    @property
    def num_groups(self) -> int:
        return self.counts_E.shape[0]

    @property
    def offsets_E(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = torch.cumsum(self.counts_E, 0).to(torch.int32)
        return self._offsets

    @property
    def host(self) -> list[int]:
        if self._host is None:
            self._host = self.counts_E.tolist()
        return self._host

    def spans(self) -> Iterator[tuple[int, slice]]:
        """(expert, its rows) of each non-empty group, from the host counts (the `loop` kernel)."""
        start = 0
        for e, rows in enumerate(self.host):
            if rows:
                yield e, slice(start, start + rows)
            start += rows


def _round_up(width: int, dtype: torch.dtype, nbytes: int) -> int:
    """`width` elements of `dtype` rounded up to a multiple of `nbytes` bytes."""
    align = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
    return -(-width // align) * align


def pad_to(width: int, dtype: torch.dtype) -> int:
    """`width` rounded up to the 16-byte stride alignment `torch._grouped_mm` requires (e.g. 6470 -> 6472 in bf16)."""
    return _round_up(width, dtype, 16)


def row_stride(width: int, dtype: torch.dtype) -> int:
    """The row stride the `loop` kernel gives its [rows, width] products: `width` rounded up to 64 bytes. MKL writes
    an output whose rows do not start on 64-byte boundaries far slower (CPU, fp32, [520, 768] x [768, 4393]: 103
    GFLOP/s into rows of 4393, 130-146 into rows of 4400-4480), and AoE's equal-parameter widths rarely align
    (d_wide = 4393, 4195 and 1075 for the d_low 64 / 128 and 64-expert benchmark cases)."""
    return _round_up(width, dtype, 64)


def strided_empty(shape: tuple[int, ...], like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """A tensor of `shape` (uninitialised, or zeros) whose rows are `row_stride` apart: a view into a wider buffer."""
    make = like.new_zeros if zero else like.new_empty
    return make(*shape[:-1], row_stride(shape[-1], like.dtype))[..., : shape[-1]]


def grouped_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Where `torch._grouped_mm` has a kernel: on CPU for fp32 / bf16 / fp16, on CUDA (and meta) for bf16."""
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    return dtype == torch.bfloat16


def choose_kernel(
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    widths: tuple[int, ...] = (),
    rows_per_group: float = float("inf"),
) -> str:
    """The kernel to run. `auto`: on an accelerator `grouped`, the only one that needs no host synchronisation. On
    CPU, by the rows per expert: `loop` from `LOOP_ROWS_ON_CPU` on, where its expert-by-expert chain keeps each
    expert's intermediates in cache for the elementwise steps (measured 10-12% faster than `grouped` at 8 experts ×
    512 rows), `grouped` below (1-4% faster at 64 × 96; `aoe-ep bench layer` prints both, as `experts` and
    `experts_<other>`). Dtypes without a grouped kernel (float64; on CUDA all but bf16) and operand `widths` that are
    not 16-byte aligned (odd test shapes; a hidden width is padded instead) always loop."""
    if requested not in EXPERT_KERNELS:
        raise ValueError(f"expert kernel must be one of {EXPERT_KERNELS}, got {requested!r}")
    if not grouped_supported(device, dtype) or any(pad_to(w, dtype) != w for w in widths):
        return "loop"
    if requested == "auto":
        return "loop" if device.type == "cpu" and rows_per_group >= LOOP_ROWS_ON_CPU else "grouped"
    return requested


LOOP_ROWS_ON_CPU = 256  # the 2-core CPU machines: see `choose_kernel`


def _empty_wgrad(a_MI: torch.Tensor, b_MN: torch.Tensor, groups: Groups) -> torch.Tensor:
    return a_MI.new_zeros(groups.num_groups, a_MI.shape[1], b_MN.shape[1])


def gmm(a_MI: torch.Tensor, w_EIN: torch.Tensor, groups: Groups, kernel: str) -> torch.Tensor:
    """out[m] = a[m] @ w[e(m)]: [M, K] x [E, K, N] -> [M, N]. `w_EIN` may be a transposed view (dgrad)."""
    if a_MI.shape[0] == 0:
        return a_MI.new_empty(0, w_EIN.shape[2])
    if kernel == "grouped":
        return torch._grouped_mm(a_MI, w_EIN, offs=groups.offsets_E)
    out_MN = a_MI.new_empty(a_MI.shape[0], w_EIN.shape[2])
    for e, rows in groups.spans():
        torch.mm(a_MI[rows], w_EIN[e], out=out_MN[rows])
    return out_MN


def gmm_wgrad(a_MI: torch.Tensor, b_MN: torch.Tensor, groups: Groups, kernel: str) -> torch.Tensor:
    """w[e] = a_e^T @ b_e over each group's rows: [M, K], [M, N] -> [E, K, N] (zeros for an empty group)."""
    if a_MI.shape[0] == 0:
        return _empty_wgrad(a_MI, b_MN, groups)
    if kernel == "grouped":
        return torch._grouped_mm(a_MI.t(), b_MN, offs=groups.offsets_E)
    out_EIN = (
        a_MI.new_zeros(groups.num_groups, a_MI.shape[1], b_MN.shape[1])
        if 0 in groups.host
        else a_MI.new_empty(groups.num_groups, a_MI.shape[1], b_MN.shape[1])
    )
    for e, rows in groups.spans():
        torch.mm(a_MI[rows].t(), b_MN[rows], out=out_EIN[e])
    return out_EIN
