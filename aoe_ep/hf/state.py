"""A checkpoint's full single-device model state on CPU, read from its DCP shards in this process alone: no process
group, no GPU, whatever layout saved it (EP 1/2/4/8, DP, DDP or FSDP2).

Expert tensors are saved by global identity at their single-device shape and dense ones as replicated tensors or
FSDP2 DTensors of their full shape, so DCP's metadata names every model tensor at the shape a one-process model
holds; each is read whole into a CPU tensor. The files are checked against the SHA-256 digests of `meta.json`
first, and nothing is unpickled beyond DCP's metadata records (`aoe_ep.train.checkpoint_integrity`).
"""

from __future__ import annotations

import pathlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from aoe_ep.config import Config
from aoe_ep.eval.loading import find_checkpoint, read_config
from aoe_ep.train import checkpoint as ckpt
from aoe_ep.train.checkpoint_integrity import (
    MANIFEST_KEY,
    CheckpointError,
    SafeFileSystemReader,
    TensorsOnlyLoadPlanner,
    file_sha256,
)

MODEL_PREFIX = "model."


def verify_files(path: Path, meta: dict) -> None:
    """Every file of the checkpoint against the digests recorded at save time (one process)."""
    manifest = meta.get(MANIFEST_KEY)
    if not isinstance(manifest, dict) or not manifest:
        raise CheckpointError(f"{path}: meta.json has no '{MANIFEST_KEY}' file digests; it cannot be trusted")
    for name, digest in sorted(manifest.items()):
        file = path / name
        if pathlib.PurePath(name).name != name or not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing; the checkpoint was modified or corrupted")
        if file_sha256(file).hex() != digest:
            raise CheckpointError(
                f"{path}: {name} does not match the SHA-256 recorded when it was saved; the "
                f"checkpoint was modified or corrupted"
            )


def read_model_state(spec: str | Path) -> tuple[Path, Config, dict, dict[str, torch.Tensor]]:
    """(checkpoint path, its config, its meta.json, {parameter or buffer name: full CPU tensor}) of a checkpoint
    directory or a run directory (its newest checkpoint), as `aoe-ep eval` takes them."""
    path = find_checkpoint(spec)
    cfg = read_config(path)
    meta = ckpt.read_meta(path)
    verify_files(path, meta)
    reader = SafeFileSystemReader(str(path))
    metadata = reader.read_metadata()
    model: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata):
            model[key[len(MODEL_PREFIX) :]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not model:
        raise CheckpointError(f"{path}: holds no model tensors")
    try:
        with warnings.catch_warnings():  # reading in one process is the intent here, not a fallback
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                {"model": model},
                storage_reader=SafeFileSystemReader(str(path)),
                planner=TensorsOnlyLoadPlanner(),
                no_dist=True,
            )
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read: {str(err).strip().splitlines()[-1]}") from None
    return path, cfg, meta, model
