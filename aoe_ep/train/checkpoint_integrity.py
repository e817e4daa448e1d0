"""Loading a checkpoint never runs code from it, and a modified or corrupted one is refused with a clear error.

torch.distributed.checkpoint unpickles its `.metadata` file with `pickle.load` and every non-tensor value with
`torch.load(weights_only=False)`: a crafted checkpoint could run anything. Here
- the saved state holds tensors only (the trainer encodes integers and generator states as tensors;
  `assert_tensors_only` checks it at save time), and the load planner refuses any pickled value;
- `.metadata` is read with an unpickler that only builds DCP's own metadata records and a few torch value types;
- tensor data goes through DCP's `torch.load(weights_only=True)`; `meta.json` is JSON and `config.yaml` safe YAML;
- `meta.json` records the SHA-256 of every file, computed at save time (the ranks share the files out) and checked
  by all ranks together before anything is read, so that every rank refuses a modified checkpoint with the same
  message.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.planner import ReadItem

from aoe_ep.hashing import file_sha256


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, written, trusted or fitted to the configured model."""


# ----------------------------------------------------------------------------------------------------------------
# Tensors only


def assert_tensors_only(state: Any, path: str = "") -> None:
    """Raise if the nested dict `state` holds anything DCP would pickle."""
    if isinstance(state, dict):
        for key, value in state.items():
            assert_tensors_only(value, f"{path}.{key}" if path else str(key))
    elif not isinstance(state, torch.Tensor):
        raise TypeError(f"checkpoint state {path!r} is a {type(state).__name__}, not a tensor: it would be pickled")


class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that a pickled (non-tensor) value in the checkpoint is refused unread."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"{read_item.dest_index.fqn}: the checkpoint holds a pickled object there; "
            f"aoe-ep checkpoints hold tensors only and never unpickle arbitrary objects"
        )


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records, torch.Size, dtypes and layouts, paths; nothing else."""

    ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == dcp_metadata.__name__ and not name.startswith("__"):
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__:
                return obj
        raise CheckpointError(
            f"the checkpoint's .metadata refers to {module}.{name}, which a DCP metadata file "
            f"never holds; refusing to unpickle it"
        )


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` goes through `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(
                    f"{path}: not a readable DCP metadata file ({type(err).__name__}: {err})"
                ) from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----------------------------------------------------------------------------------------------------------------
# SHA-256 manifest

DIGEST_BYTES = 32
MANIFEST_KEY = "sha256"


def _mine(names: list[str]) -> range:
    """The files this rank hashes: every world-th one."""
    return range(dist.get_rank(), len(names), dist.get_world_size())


def shard_digests(directory: Path, device: torch.device) -> dict[str, str]:
    """Collective: SHA-256 of every file in `directory` (as it is now), the ranks sharing the work; every rank gets
    the whole {name: hex digest} map."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    digests = torch.zeros(len(names), DIGEST_BYTES, dtype=torch.uint8)
    for i in _mine(names):
        digests[i] = torch.frombuffer(bytearray(file_sha256(directory / names[i])), dtype=torch.uint8)
    digests = digests.to(device)
    if dist.get_world_size() > 1:
        dist.all_reduce(digests)  # each row is non-zero on one rank only (uint8 sum: no overflow)
    return {name: bytes(row.cpu().tolist()).hex() for name, row in zip(names, digests)}


def verify_digests(path: Path, manifest: Any, device: torch.device) -> None:
    """Collective: every rank checks its share of the files against `manifest` and all raise the same
    CheckpointError if any file is missing or differs."""
    if not isinstance(manifest, dict) or not manifest:
        raise CheckpointError(
            f"{path}: meta.json has no '{MANIFEST_KEY}' file digests (written by an older aoe-ep, "
            f"or modified); it cannot be trusted"
        )
    names = sorted(manifest)
    status = torch.zeros(len(names), dtype=torch.int64)  # 1: missing, 2: differs
    for i in _mine(names):
        file = path / names[i]
        if pathlib.PurePath(names[i]).name != names[i]:
            status[i] = 2  # a name with a directory part is not one this code wrote
        elif not file.is_file():
            status[i] = 1
        elif file_sha256(file).hex() != manifest[names[i]]:
            status[i] = 2
    status = status.to(device)
    if dist.get_world_size() > 1:
        dist.all_reduce(status)
    bad = [(name, int(s)) for name, s in zip(names, status.cpu().tolist()) if s]
    if bad:
        name, kind = bad[0]
        what = "is missing" if kind == 1 else "does not match the SHA-256 recorded when it was saved"
        raise CheckpointError(
            f"{path}: {name} {what}"
            + (f" ({len(bad)} files in all)" if len(bad) > 1 else "")
            + "; the checkpoint was modified or corrupted, resume from another one"
        )
