"""Every rank must run the same experiment with the same code: a rank started with another config (a stale YAML on
one node, a different `--set`) or other package versions would train another model, or hang in a collective whose
shapes differ. At start-up the ranks compare one hash of their config and versions; on a mismatch they exchange the
texts and every rank raises the same `ConfigError` naming what differs and on which ranks.

State that every rank holds as one replica and updates by itself (the balancing biases of `moe.balance: bias`) is
compared the same way before it is checkpointed: DCP writes a replicated tensor from one rank only, so a rank that
had drifted would otherwise be overwritten silently on the next resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

import aoe_ep
from aoe_ep.config import Config, ConfigError
from aoe_ep.hashing import digest63
from aoe_ep.train.guards import TrainingError

PACKAGE_DIR = Path(aoe_ep.__file__).resolve().parent


def source_digest() -> str:
    """SHA-256 over aoe_ep's Python sources (paths and contents): two checkouts that differ in any file differ."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    try:
        megatron = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        megatron = "not installed"
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "megatron-core": megatron,
        "numpy": str(np.__version__),
        "aoe_ep": str(aoe_ep.__version__),
        "aoe_ep sources": source_digest(),
    }


def identity(cfg: Config, resume: Optional[str] = None) -> dict:
    """What must agree across ranks: the whole config, `--resume` and the package versions."""
    return {"config": dataclasses.asdict(cfg), "command": {"--resume": resume}, "packages": package_versions()}


def check_ranks_agree(cfg: Config, device: torch.device, resume: Optional[str] = None, group=None) -> None:
    """Collective over `group` (default: the world). Raises the same ConfigError on every rank on a mismatch."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    text = yaml.safe_dump(identity(cfg, resume), sort_keys=True).encode()
    mine = torch.tensor([digest63(text), len(text)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if all(torch.equal(g[0], gathered[0][0]) for g in gathered):
        return
    # Rare path: exchange the texts (padded to the longest) so that every rank can name the same differences.
    longest = max(int(g[1]) for g in gathered)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
    texts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(texts, buf, group=group)
    identities = [yaml.safe_load(bytes(t[: int(g[1])].cpu().tolist()).decode()) for t, g in zip(texts, gathered)]
    raise ConfigError(describe_differences(identities))


def _flatten(identity_: dict) -> dict[str, object]:
    flat = {}
    for section, values in identity_["config"].items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    flat.update(identity_["command"])
    flat.update(identity_["packages"])
    return flat


def describe_differences(identities: list[dict]) -> str:
    """'train.lr: 0.01 on ranks 0, 2; 0.02 on rank 1; torch: ...' for every key whose value is not the same on all
    ranks (config fields first, then packages)."""
    flats = [_flatten(i) for i in identities]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    parts = []
    for key in keys:
        values = [flat.get(key, "<missing>") for flat in flats]
        if all(v == values[0] for v in values):
            continue
        by_value: dict[str, list[int]] = {}
        for rank, value in enumerate(values):
            by_value.setdefault(repr(value), []).append(rank)
        where = "; ".join(
            f"{value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            for value, ranks in by_value.items()
        )
        parts.append(f"{key}: {where}")
    return (
        " | ".join(parts) + " -- the ranks were started with different configurations or package versions; "
        "start every node with the same config, overrides and installation"
    )


def check_replicas_agree(named: dict[str, torch.Tensor], group=None) -> None:
    """Collective over `group` (default: the world): every rank holds bit-identical values of the replicated tensors
    `named`, else every rank raises the same TrainingError naming the tensors that differ and the ranks."""
    world = dist.get_world_size(group)
    if world == 1 or not named:
        return
    flat = torch.cat([t.detach().reshape(-1).double() for t in named.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    parts, start = [], 0
    for name, t in named.items():
        end = start + t.numel()
        ranks = [r for r in range(1, world) if not torch.equal(gathered[r][start:end], gathered[0][start:end])]
        if ranks:
            parts.append(
                f"{name} differs from rank 0's on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            )
        start = end
    raise TrainingError(
        "; ".join(parts) + " -- state that every rank updates as one replica has diverged; not checkpointing it"
    )
