"""Named fields packed into one float64 tensor for a single collective, and read back by name.

A reduction that sums (or maxes) several statistics at once concatenates them along the last dimension; `pack`
records where each field went, `PackedLayout.unpack` cuts the reduced tensor back into the same fields, so no caller
does index arithmetic. Fields may share leading (batch) dimensions, e.g. one row per layer; a field with no last
dimension of its own (a scalar per row) takes one slot and comes back without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class PackedLayout:
    """names in packing order; widths: each field's slots, None for a scalar field (one slot, unpacked to the batch
    shape); batch_dims: how many leading dimensions every field shares."""

    names: tuple[str, ...]
    widths: tuple[Optional[int], ...]
    batch_dims: int = 0

    @property
    def size(self) -> int:
        return sum(1 if w is None else w for w in self.widths)

    def unpack(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fields of a packed tensor (views into it), by name."""
        if packed.dim() != self.batch_dims + 1 or packed.shape[-1] != self.size:
            raise ValueError(
                f"a packed tensor of {self.batch_dims} batch dimension(s) and {self.size} slots was "
                f"expected, got shape {tuple(packed.shape)}"
            )
        out, start = {}, 0
        for name, width in zip(self.names, self.widths):
            piece = packed[..., start : start + (1 if width is None else width)]
            out[name] = piece[..., 0] if width is None else piece
            start += piece.shape[-1]
        return out


def pack(fields: dict[str, torch.Tensor], batch_dims: int = 0) -> tuple[torch.Tensor, PackedLayout]:
    """(the fields as float64, concatenated along the last dimension, their layout). Each field has the batch shape
    (a scalar per batch element) or the batch shape plus one dimension; all share the batch shape and the device."""
    if not fields:
        raise ValueError("pack needs at least one field")
    batch = torch.as_tensor(next(iter(fields.values()))).shape[:batch_dims]
    pieces, widths = [], []
    for name, t in fields.items():
        t = torch.as_tensor(t)
        if t.dim() not in (batch_dims, batch_dims + 1) or t.shape[:batch_dims] != batch:
            raise ValueError(
                f"field {name!r}: shape {tuple(t.shape)} is not the batch shape {tuple(batch)} "
                f"with at most one more dimension"
            )
        scalar = t.dim() == batch_dims
        pieces.append(t.double().unsqueeze(-1) if scalar else t.double())
        widths.append(None if scalar else t.shape[-1])
    return torch.cat(pieces, dim=-1), PackedLayout(tuple(fields), tuple(widths), batch_dims)
