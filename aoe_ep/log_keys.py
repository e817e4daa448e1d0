"""The names per-layer MoE values are logged under: `moe/layerNN/<metric>`, NN the layer's index among the model's
MoE layers in two digits (`moe/layer03/load`). Written by the trainer's metrics, read back by the run-log reader, the
report and the placement planner."""

from __future__ import annotations

import re
from typing import Optional

LAYER_PREFIX = "moe/layer"
LAYER_KEY = re.compile(rf"^{LAYER_PREFIX}(\d+)/(.+)$")


def layer_prefix(layer: int) -> str:
    """`moe/layerNN`, the part every key of MoE layer `layer` starts with."""
    if layer < 0:
        raise ValueError(f"a layer index is >= 0, got {layer}")
    return f"{LAYER_PREFIX}{layer:02d}"


def layer_key(layer: int, metric: str) -> str:
    """`moe/layerNN/metric` for MoE layer `layer`."""
    return f"{layer_prefix(layer)}/{metric}"


def parse_layer_key(key: str) -> Optional[tuple[int, str]]:
    """(layer, metric) of a per-layer key, None for any other key."""
    m = LAYER_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else None
