"""Checkpoints hold tensors only and loading never unpickles arbitrary objects; a modified checkpoint is refused by
every rank with the same error; a save into a full or unwritable train.out_dir fails on every rank with one clear
error and leaves the previous checkpoint loadable."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train import checkpoint as ckpt
from aoe_ep.train.checkpoint_integrity import SafeFileSystemReader, file_sha256
from aoe_ep.train.trainer import Trainer, train
from tests.train.synthetic import BUILDERS, small_config


def _config(tmp_path, *overrides):
    return small_config(
        tmp_path,
        "train.max_steps=6",
        "train.save_interval=2",
        "train.eval_interval=100",
        "train.eval_at_start=false",
        *overrides,
    )


def _rehash(checkpoint: Path, name: str) -> None:
    """Record `name`'s current digest in meta.json, as someone who tampers on purpose would."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta[ckpt.MANIFEST_KEY][name] = file_sha256(checkpoint / name).hex()
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("saved")
    train(_config(tmp, "train.max_steps=2"), data=BUILDERS)
    return tmp / "run" / "checkpoints" / "step_00000002"


def _copy(saved: Path, tmp_path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(saved.parent.parent, out)
    return out, out / "checkpoints" / saved.name


def test_a_checkpoint_holds_tensors_only(saved):
    metadata = SafeFileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert metadata and all(isinstance(m, TensorStorageMetadata) for m in metadata.values())
    assert "rng_rank0.python" in metadata and "scheduler.num_steps" in metadata


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_metadata_file_is_never_unpickled(saved, tmp_path):
    out, checkpoint = _copy(saved, tmp_path)
    marker = tmp_path / "code_ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    _rehash(checkpoint, ".metadata")
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata refers to posix\.system.*refusing to unpickle"):
        Trainer(_config(tmp_path), resume="latest", data=BUILDERS)
    assert not marker.exists()


def test_a_pickled_value_in_place_of_a_tensor_is_refused(saved, tmp_path):
    out, checkpoint = _copy(saved, tmp_path)
    # a checkpoint whose "progress.step" is a pickled object, with a consistent manifest
    reader = SafeFileSystemReader(str(checkpoint))
    state = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in reader.read_metadata().state_dict_metadata.items()
    }
    dcp.load(state, checkpoint_id=str(checkpoint))
    state["progress.step"] = _Payload(str(tmp_path / "code_ran"))
    for f in [*checkpoint.glob("*.distcp"), checkpoint / ".metadata"]:
        f.unlink()
    dcp.save(state, checkpoint_id=str(checkpoint))
    for f in checkpoint.iterdir():
        if f.name != "meta.json":
            _rehash(checkpoint, f.name)
    with pytest.raises(ckpt.CheckpointError, match=r"progress\.step: the checkpoint holds a pickled object"):
        Trainer(_config(tmp_path), resume="latest", data=BUILDERS)
    assert not (tmp_path / "code_ran").exists()


def test_an_unreadable_meta_json_is_a_clear_error(saved, tmp_path):
    out, checkpoint = _copy(saved, tmp_path)
    (checkpoint / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"meta\.json: cannot be read"):
        Trainer(_config(tmp_path), resume="latest", data=BUILDERS)


@contextlib.contextmanager
def _file_size_limit(limit_bytes):
    """Writes past `limit_bytes` fail with EFBIG, as on a full disk (None: no limit)."""
    if limit_bytes is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def _unprivileged_saves():
    """Checkpoint saves run without root's effective uid, for which no directory is read-only; only around the save,
    as this Python's files may be unreadable to other users."""
    if os.geteuid() != 0:
        yield
        return
    save = ckpt.save_checkpoint

    def unprivileged_save(*args, **kwargs):
        os.seteuid(65534)
        try:
            return save(*args, **kwargs)
        finally:
            os.seteuid(0)

    ckpt.save_checkpoint = unprivileged_save
    try:
        yield
    finally:
        ckpt.save_checkpoint = save


def _save_failure_worker(rank: int, world: int, base: str) -> dict:
    tmp = Path(base)
    root = tmp / "run" / "checkpoints"
    out = {}
    train(_config(tmp, "train.exit_at_step=2"), data=BUILDERS)
    with _file_size_limit(2048 if rank == 1 else None):  # rank 1's disk is full
        with pytest.raises(ckpt.CheckpointError) as err:
            train(_config(tmp), resume="latest", data=BUILDERS)
        out["full"] = str(err.value)
    out["after_full"] = sorted(p.name for p in root.iterdir())
    dist.barrier()
    if rank == 0:
        root.chmod(0o555)  # out_dir becomes read-only
    dist.barrier()
    if rank == 0:  # tensorboard's writer thread may append while a save runs unprivileged
        (tmp / "run" / "tb").chmod(0o777)
    umask = os.umask(0)
    try:
        with _unprivileged_saves(), pytest.raises(ckpt.CheckpointError) as err:
            train(_config(tmp), resume="latest", data=BUILDERS)
    finally:
        os.umask(umask)
    out["unwritable"] = str(err.value)
    dist.barrier()
    if rank == 0:
        root.chmod(0o755)
    dist.barrier()
    out["after_unwritable"] = sorted(p.name for p in root.iterdir())
    result = train(_config(tmp), resume="latest", data=BUILDERS)  # nothing lost: it resumes from step 2
    out["resumed"] = (result.history[0].step, result.step)

    dist.barrier()
    if rank == 0:  # one flipped byte in rank 1's shard of step 6
        shard = root / "step_00000006" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    with pytest.raises(ckpt.CheckpointError) as err:
        Trainer(_config(tmp), resume="latest", data=BUILDERS)
    out["tampered"] = str(err.value)
    with Trainer(_config(tmp), resume=str(root / "step_00000004"), data=BUILDERS) as earlier:  # the others load
        out["earlier"] = earlier.step
    return out


def test_full_or_unwritable_out_dir_and_a_tampered_shard_stop_every_rank():
    # outside pytest's 0700 base directory, so that an unprivileged save reaches it
    base = tempfile.mkdtemp(prefix="aoe-ep-save-failures-")
    os.chmod(base, 0o755)
    try:
        results = run_distributed(2, _save_failure_worker, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert results[0] == results[1]  # the same errors on both ranks, and both saw the same directory
    r = results[0]
    root = Path(base) / "run" / "checkpoints"
    assert r["full"].startswith(
        f"train.out_dir: cannot write checkpoint step_00000004 under {root}: "
        "File too large [errno 27]; the previous checkpoint step_00000002 is intact"
    )
    assert r["unwritable"].startswith(
        f"train.out_dir: cannot prepare checkpoint step_00000004 under {root}: "
        "Permission denied [errno 13]; the previous checkpoint step_00000002"
    )
    assert r["after_full"] == r["after_unwritable"] == ["latest", "step_00000002"]
    assert r["resumed"] == (3, 6)
    assert r["earlier"] == 4
    assert r["tampered"].startswith(
        f"{root / 'step_00000006'}: __1_0.distcp does not match the SHA-256 recorded "
        "when it was saved; the checkpoint was modified or corrupted"
    )
