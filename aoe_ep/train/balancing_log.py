"""The log values of the MoE layers' balancing schemes, under their `moe/layerNN/...` keys.

The schemes (`aoe_ep.moe.balancing`) return their values by bare name; the names per layer are given here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from aoe_ep.log_keys import layer_key
from aoe_ep.moe import LoadStats, MoELayer


def balancing_scalars(layers: Sequence[MoELayer], stats: Sequence[LoadStats] = ()) -> dict[str, float | list[float]]:
    """Each layer's scheme's values (`moe/layerNN/bias` and `bias_max_abs` under `moe.balance: bias`;
    `moe/layerNN/density` and `threshold_lambda` under threshold selection); `stats`: the logging window's
    `LoadStats` per layer, where there are any."""
    out: dict[str, float | list[float]] = {}
    for i, layer in enumerate(layers):
        window: Optional[LoadStats] = stats[i] if i < len(stats) else None
        out.update({layer_key(i, name): value for name, value in layer.balancing.log_values(layer, window).items()})
    return out
