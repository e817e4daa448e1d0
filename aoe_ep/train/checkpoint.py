"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, scheduler, data position, RNG states.

Layout under `<out_dir>/checkpoints/`: `step_00000100/` (DCP files, `meta.json`, `config.yaml`) and `latest`, a
one-line file naming the newest complete checkpoint. A save writes into `.tmp-step_.../`, and only after every rank
has finished is that directory renamed and `latest` replaced (write, fsync, rename): a crash at any point of a save
leaves the previous checkpoint and the pointer to it intact. The directory must lie on a filesystem every rank
sees (every rank writes its own shards).

Loading works after changing the number of ranks: dense weights are saved as replicated tensors (or FSDP2's
DTensors), and expert weights, sharded over the EP group, as DTensors of their single-device shape sharded on dim 0
over the "ep" mesh dimension (and, under FSDP2, further over the expert-DP "dp" dimension on the dim FSDP2 chose);
DCP reads whatever slice a rank now holds. RNG states are per rank: a rank that did not exist
at save time keeps its freshly seeded generator.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard

from aoe_ep.train.distributed import Runtime
from aoe_ep.train.optim import is_expert_param

LATEST = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or does not fit the configured model."""


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "meta.json").is_file()


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint `latest` names, or None when there is none yet."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not is_complete(path):
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def resolve_checkpoint(spec: str, out_dir: str | Path) -> Path:
    """`latest` (the newest under out_dir) or a checkpoint directory path."""
    if spec == LATEST:
        root = checkpoint_root(out_dir)
        path = latest_checkpoint(root)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint under {root} (no '{LATEST}' file); "
                                  f"train without --resume first, or name a checkpoint directory")
        return path
    path = Path(spec)
    if not is_complete(path):
        raise CheckpointError(f"--resume {spec}: not a complete checkpoint directory "
                              f"(it needs .metadata and meta.json)")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# What goes into a checkpoint


def expert_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if is_expert_param(p)}


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Tensors for torch's generators; Python's and numpy's as one pickled bytes value (DCP stores objects too)."""
    state = {"cpu": torch.get_rng_state(), "host": pickle.dumps({"python": random.getstate(),
                                                                 "numpy": np.random.get_state()})}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    host = pickle.loads(state["host"])
    random.setstate(host["python"])
    np.random.set_state(host["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _map_experts(model_sd: dict, optim_sd: dict, experts: set[str], fn) -> None:
    """Replace every expert tensor of the model and optimizer state dicts by `fn(name, tensor)`. The per-parameter
    optimizer dicts are the optimizer's own objects, so they are rebuilt, never written into."""
    states = optim_sd.get("state", {})
    for name in experts:
        model_sd[name] = fn(name, model_sd[name])
        if name in states:
            states[name] = {key: fn(name, value) if isinstance(value, torch.Tensor) and value.ndim > 0 else value
                            for key, value in states[name].items()}


def _saved_expert(t: torch.Tensor, runtime: Runtime) -> DTensor:
    """This rank's part of an expert tensor as a DTensor of the single-device shape. A plain tensor holds this
    rank's experts: [Replicate on "dp", Shard(0) on "ep"]. An FSDP2 DTensor holds a shard of them over the expert-DP
    group: [Shard(0) on "ep", Shard(d) on "dp"] of the ("ep", "dp") mesh, split in that order."""
    if not isinstance(t, DTensor):
        return DTensor.from_local(t, runtime.mesh, [Replicate(), Shard(0)], run_check=False)
    (placement,) = t.placements
    shape = torch.Size([t.shape[0] * runtime.ep_size, *t.shape[1:]])
    return DTensor.from_local(t.to_local(), runtime.expert_mesh, [Shard(0), placement], run_check=False,
                              shape=shape, stride=torch.empty(shape, device="meta").stride())


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, progress: dict,
                   runtime: Runtime) -> dict:
    """The nested dict DCP saves and loads, expert tensors as `_saved_expert` DTensors."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _map_experts(model_sd, optim_sd, expert_names(model), lambda name, t: _saved_expert(t, runtime))
    return {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "progress": dict(progress),
            f"rng_rank{runtime.rank}": _rng_state(runtime.device)}


# ----------------------------------------------------------------------------------------------------------------
# Save


def save_checkpoint(root: Path, step: int, state: dict, runtime: Runtime, meta: dict, config_yaml: str,
                    keep: int = 0) -> Optional[Path]:
    """Write `state` as checkpoint `step` (collective: every rank calls it). Returns the path, or None when a
    complete checkpoint of that step already exists (the state at a step is the same; it is left untouched)."""
    final = root / step_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    exists = torch.tensor([int(is_complete(final))], device=runtime.device)  # NCCL needs device tensors
    dist.broadcast(exists, src=0)
    if exists.item():
        return None
    if runtime.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if runtime.is_main:
        meta = dict(meta, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _write_durably(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        _write_durably(tmp / "config.yaml", config_yaml)
        publish(tmp, final, root)
        if keep:
            prune(root, keep)
    dist.barrier()
    return final


def publish(tmp: Path, final: Path, root: Path) -> None:
    """Make a fully written checkpoint visible: rename it into place, then repoint `latest` (atomic replace)."""
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_durably(root / LATEST, final.name + "\n", atomic=True)
    _fsync_dir(root)


def prune(root: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep`, never the one `latest` names."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != latest)
    for path in steps[:max(0, len(steps) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_tmp(root: Path) -> list[Path]:
    """Delete what an interrupted save left behind (rank 0, before training starts)."""
    stale = [p for p in root.glob(f"{TMP_PREFIX}*") if p.is_dir()] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _write_durably(path: Path, text: str, atomic: bool = False) -> None:
    target = path.with_name(path.name + ".tmp") if atomic else path
    with open(target, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# Load


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    runtime: Runtime) -> dict:
    """Restore model, optimizer, scheduler and (where saved for this rank) RNG state; returns the progress dict."""
    state = training_state(model, optimizer, scheduler, {"step": 0, "consumed_samples": 0}, runtime)
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    rng_key = f"rng_rank{runtime.rank}"
    if not any(key.startswith(rng_key + ".") for key in saved):
        del state[rng_key]
    # Per-parameter moments are loaded by name; the groups (which parameters share hyperparameters) are this run's:
    # their make-up changes with the layout (expert-parallel or not), and lr / weight decay come from the schedule.
    param_groups = state["optim"].pop("param_groups")
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # DCP wraps per-rank failures in CheckpointException; one line is what users need
        raise CheckpointError(f"{path}: cannot be loaded into this model and optimizer: "
                              f"{str(err).strip().splitlines()[-1]}") from err

    params = dict(model.named_parameters())

    def to_param_layout(name: str, t: DTensor) -> torch.Tensor:
        """Back to the parameter's own kind: a plain tensor, or a DTensor like FSDP2's (moments share its spec)."""
        like = params[name]
        if not isinstance(like, DTensor):
            return t.to_local()
        return DTensor.from_local(t.to_local(), like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())

    _map_experts(state["model"], state["optim"], expert_names(model), to_param_layout)
    state["optim"]["param_groups"] = param_groups
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    if rng_key in state:
        _set_rng_state(state[rng_key], runtime.device)
    return state["progress"]


def load_model_weights(path: Path, model: nn.Module, runtime: Runtime) -> None:
    """Restore only the model's weights (for evaluation and generation: no optimizer is built), in whatever
    layout `model` has now (this rank's expert slice under expert parallelism)."""
    experts = expert_names(model)
    model_sd = get_model_state_dict(model)
    _map_experts(model_sd, {}, experts, lambda name, t: _saved_expert(t, runtime))
    state = {"model": model_sd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be loaded into this model: "
                              f"{str(err).strip().splitlines()[-1]}") from err
    _map_experts(state["model"], {}, experts, lambda name, t: t.to_local())
    set_model_state_dict(model, state["model"])


def describe(path: Path) -> str:
    meta = read_meta(path)
    return (f"{path} (step {meta.get('step')}, saved by {meta.get('world_size')} rank(s), "
            f"expert-parallel size {meta.get('expert_parallel_size')})")
