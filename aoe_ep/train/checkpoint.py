"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, scheduler, data position, RNG states.

Layout under `<out_dir>/checkpoints/`: `step_00000100/` (DCP files, `meta.json`, `config.yaml`) and `latest`, a
one-line file naming the newest complete checkpoint. A save writes into `.tmp-step_.../`, and only after every rank
has finished is that directory renamed and `latest` replaced (write, fsync, rename): a crash at any point of a save
leaves the previous checkpoint and the pointer to it intact. The directory must lie on a filesystem every rank
sees (every rank writes its own shards). `latest` holds a bare step directory name, never a path. Resuming from a
checkpoint older than the newest starts a new history: `set_aside_after` moves the later ones into
`superseded_after_step_.../` beside them (kept) and points `latest` at the resumed one.

Loading works after changing the number of ranks: dense weights are saved as replicated tensors (or FSDP2's
DTensors), and expert weights, sharded over the EP group, as DTensors of their single-device shape sharded on dim 0
over the "ep" mesh dimension (and, under FSDP2, further over the expert-DP "dp" dimension on the dim FSDP2 chose);
DCP reads whatever slice a rank now holds. Experts are saved by global identity: under an expert placement other than
the contiguous one (`parallel.expert_placement`), a rank's stack is moved to the contiguous split before the save
and from it to the rank's placement after the load (`aoe_ep.parallel.reshard`), optimizer moments with their
experts; `meta.json` records the placement and the load it was chosen from. RNG states are per rank: a rank that did
not exist
at save time keeps its freshly seeded generator.

Everything saved is a tensor (step counters and generator states are encoded as tensors), `meta.json` records every
file's SHA-256, and loading goes through `checkpoint_integrity`: nothing in a checkpoint is unpickled beyond DCP's
own metadata records, and a modified file is refused before it is read. A save that fails on any rank (an
unwritable or full disk) fails on every rank with one `CheckpointError`, removes what it wrote, and leaves the
previous checkpoint and `latest` as they were.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from aoe_ep.moe import MoELayer
from aoe_ep.moe.placement import Placement
from aoe_ep.parallel.reshard import move_experts
from aoe_ep.parallel.runtime import Runtime
from aoe_ep.train.checkpoint_integrity import (
    MANIFEST_KEY,
    CheckpointError,
    SafeFileSystemReader,
    TensorsOnlyLoadPlanner,
    assert_tensors_only,
    file_sha256,
    shard_digests,
    verify_digests,
)
from aoe_ep.train.interrupt import HeldSigint, sigint_deferred
from aoe_ep.train.optim import is_expert_param

LATEST = "latest"
TMP_PREFIX = ".tmp-"
SUPERSEDED_PREFIX = "superseded_after_"
STEP_NAME = re.compile(r"step_\d{8}")


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
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pointer}: cannot be read ({err})") from None
    if not name:
        raise CheckpointError(
            f"{pointer} is empty: it should name a checkpoint such as step_00000100; write "
            f"the newest step directory's name into it, or delete it"
        )
    if not STEP_NAME.fullmatch(name):  # a path would let `latest` point outside the run directory
        raise CheckpointError(
            f"{pointer} holds {name[:80]!r}, not the name of a step directory beside it (such as step_00000100)"
        )
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which does not exist")
    if not is_complete(path):
        raise CheckpointError(f"{pointer} names {name}, which is incomplete (no .metadata or meta.json)")
    return path


def checkpoint_steps(root: Path) -> dict[int, Path]:
    """The complete checkpoints directly under `root`, by step."""
    if not root.is_dir():
        return {}
    return {
        int(p.name[len("step_") :]): p
        for p in root.iterdir()
        if STEP_NAME.fullmatch(p.name) and p.is_dir() and is_complete(p)
    }


def set_aside_after(root: Path, step: int) -> Optional[Path]:
    """Start a new branch of history at `step` (rank 0): move every checkpoint of a later step into
    `root/superseded_after_step_NNNNNNNN_<time>/` (kept, never deleted) and point `latest` at `step`'s checkpoint
    when it lies under `root` (else remove `latest` until the first save). Returns the folder, or None when there
    was nothing later."""
    later = sorted(p for s, p in checkpoint_steps(root).items() if s > step)
    if not later:
        return None
    aside = root / f"{SUPERSEDED_PREFIX}{step_name(step)}_{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = aside.with_name(f"{aside.name.rsplit('.', 1)[0]}.{suffix}")
    aside.mkdir()
    for path in later:
        os.rename(path, aside / path.name)
    _fsync_dir(aside)
    current = root / step_name(step)
    if is_complete(current):
        _write_durably(root / LATEST, current.name + "\n", atomic=True)
    else:
        (root / LATEST).unlink(missing_ok=True)
    _fsync_dir(root)
    return aside


def resolve_checkpoint(spec: str, out_dir: str | Path) -> Path:
    """`latest` (the newest under out_dir) or a checkpoint directory path."""
    if spec == LATEST:
        root = checkpoint_root(out_dir)
        path = latest_checkpoint(root)
        if path is None:
            raise CheckpointError(
                f"--resume: no checkpoint under {root} (no '{LATEST}' file); "
                f"train without --resume first, or name a checkpoint directory"
            )
        return path
    path = Path(spec)
    if not is_complete(path):
        raise CheckpointError(
            f"--resume {spec}: not a complete checkpoint directory (it needs .metadata and meta.json)"
        )
    return path


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/meta.json: cannot be read ({err})") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("step"), int)
        or not isinstance(meta.get("consumed_samples"), int)
    ):
        raise CheckpointError(
            f"{path}/meta.json: not a checkpoint description (no integer step and "
            f"consumed_samples); the checkpoint was modified or corrupted"
        )
    return meta


def verify_checkpoint(path: Path, device: torch.device) -> dict:
    """Collective: check every file against the SHA-256 digests in meta.json (all ranks raise together); returns
    the meta dict."""
    meta = read_meta(path)
    verify_digests(path, meta.get(MANIFEST_KEY), device)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# What goes into a checkpoint


def expert_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if is_expert_param(p)}


def expert_placements(model: nn.Module) -> dict[str, Placement]:
    """The placement of each expert-parallel tensor's layer, by parameter name (only where it is not contiguous)."""
    out = {}
    for prefix, layer in model.named_modules():
        if isinstance(layer, MoELayer) and not layer.placement.is_contiguous:
            for name, p in layer.named_parameters():
                if is_expert_param(p):
                    out[f"{prefix}.{name}" if prefix else name] = layer.placement
    return out


def _to_contiguous(placements: dict[str, Placement], runtime: Runtime):
    """fn(name, local stack) -> the stack the rank holds under the contiguous split (what a checkpoint stores)."""

    def fn(name: str, t: torch.Tensor) -> torch.Tensor:
        placement = placements.get(name)
        if placement is None:
            return t
        return move_experts(
            t, placement, Placement.contiguous(placement.num_experts, placement.num_devices), runtime.groups.ep_group
        )

    return fn


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's generators, Python's and numpy's, as tensors (so that loading them unpickles nothing)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "cpu": torch.get_rng_state(),
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    python = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss if has_gauss else None))
    pos, np_has_gauss, cached = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(np_has_gauss), cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _scheduler_state(scheduler: Any) -> dict[str, torch.Tensor]:
    """The scheduler's numbers as float64 tensors (its strings are the configuration's, rebuilt on load)."""
    return {
        k: torch.tensor(float(v), dtype=torch.float64)
        for k, v in scheduler.state_dict().items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _load_scheduler_state(scheduler: Any, saved: dict[str, torch.Tensor]) -> None:
    state = scheduler.state_dict()
    for key, value in saved.items():
        state[key] = int(value) if isinstance(state.get(key), int) else float(value)
    scheduler.load_state_dict(state)


def _map_experts(model_sd: dict, optim_sd: dict, experts: set[str], fn) -> None:
    """Replace every expert tensor of the model and optimizer state dicts by `fn(name, tensor)`. The per-parameter
    optimizer dicts are the optimizer's own objects, so they are rebuilt, never written into."""
    states = optim_sd.get("state", {})
    for name in sorted(experts):  # one order on every rank: moving a placed expert is a collective
        model_sd[name] = fn(name, model_sd[name])
        if name in states:
            states[name] = {
                key: fn(name, value) if isinstance(value, torch.Tensor) and value.ndim > 0 else value
                for key, value in states[name].items()
            }


def _saved_expert(t: torch.Tensor, runtime: Runtime) -> DTensor:
    """This rank's part of an expert tensor as a DTensor of the single-device shape. A plain tensor holds this
    rank's experts: [Replicate on "dp", Shard(0) on "ep"]. An FSDP2 DTensor holds a shard of them over the expert-DP
    group: [Shard(0) on "ep", Shard(d) on "dp"] of the ("ep", "dp") mesh, split in that order."""
    if not isinstance(t, DTensor):
        return DTensor.from_local(t, runtime.mesh, [Replicate(), Shard(0)], run_check=False)
    (placement,) = t.placements
    shape = torch.Size([t.shape[0] * runtime.ep_size, *t.shape[1:]])
    return DTensor.from_local(
        t.to_local(),
        runtime.expert_mesh,
        [Shard(0), placement],
        run_check=False,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
    )


def _state_and_groups(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict,
    runtime: Runtime,
    by_identity: bool = True,
) -> tuple[dict, list]:
    """by_identity: move placed expert stacks to the contiguous split (a save; a load's template needs only the
    shapes)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    move = _to_contiguous(expert_placements(model) if by_identity else {}, runtime)
    _map_experts(model_sd, optim_sd, expert_names(model), lambda name, t: _saved_expert(move(name, t), runtime))
    # Per-parameter moments are saved by name; the groups (which parameters share hyperparameters) are each run's:
    # their make-up changes with the layout (expert-parallel or not), and lr / weight decay come from the schedule.
    param_groups = optim_sd.pop("param_groups")
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": _scheduler_state(scheduler),
        "progress": {k: torch.tensor(int(v), dtype=torch.int64) for k, v in progress.items()},
        f"rng_rank{runtime.rank}": _rng_state(runtime.device),
    }
    return state, param_groups


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, progress: dict, runtime: Runtime
) -> dict:
    """The nested dict of tensors DCP saves and loads, expert tensors as `_saved_expert` DTensors."""
    return _state_and_groups(model, optimizer, scheduler, progress, runtime)[0]


# ----------------------------------------------------------------------------------------------------------------
# Save


def save_checkpoint(
    root: Path, step: int, state: dict, runtime: Runtime, meta: dict, config_yaml: str, keep: int = 0
) -> Optional[Path]:
    """Write `state` as checkpoint `step` (collective: every rank calls it). Returns the path, or None when a
    complete checkpoint of that step already exists (the state at a step is the same; it is left untouched).

    Each stage that touches the disk ends with every rank knowing whether it worked on every rank (a broadcast of
    rank 0's outcome, or DCP's own gathering of the ranks' write results), so that a failure raises the same
    CheckpointError everywhere instead of leaving the other ranks waiting in the next collective.

    A Ctrl-C during the save is held back until the checkpoint is complete and raised then (a second one abandons
    the save, leaving the previous checkpoint as it was): cut short inside torch's serializer, an interruption is
    otherwise swallowed or reported as a garbled write error."""
    assert_tensors_only(state)
    with sigint_deferred(f"writing checkpoint {step_name(step)}" if runtime.is_main else None) as held:
        return _save(root, step, state, runtime, meta, config_yaml, keep, held)


def _save(
    root: Path, step: int, state: dict, runtime: Runtime, meta: dict, config_yaml: str, keep: int, held: HeldSigint
) -> Optional[Path]:
    final = root / step_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"

    def prepare() -> bool:
        if is_complete(final):
            return True
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return False

    exists = _on_main_then_broadcast(prepare, runtime, root, step, "prepare")
    if exists:
        return None
    try:
        dcp.save(state, checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as err:  # raised on every rank: DCP gathers the ranks' results
        _abandon(tmp, final, root, runtime)
        if held.count or any(isinstance(e, KeyboardInterrupt) for e in _causes(err)):
            raise KeyboardInterrupt from None  # Ctrl-C during the write: an interruption, not a write failure
        raise _save_error(root, step, "write", _first_os_error(err), err) from None
    digests = shard_digests(tmp, runtime.device)

    def finish() -> bool:
        full_meta = dict(meta, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _write_durably(tmp / "config.yaml", config_yaml)
        full_meta[MANIFEST_KEY] = dict(digests, **{"config.yaml": file_sha256(tmp / "config.yaml").hex()})
        _write_durably(tmp / "meta.json", json.dumps(full_meta, indent=2) + "\n")
        publish(tmp, final, root)
        return False

    try:
        _on_main_then_broadcast(finish, runtime, root, step, "publish")
    except CheckpointError:
        _abandon(tmp, final, root, runtime)
        raise
    if runtime.is_main and keep:
        prune(root, keep)
    dist.barrier()
    return final


def _on_main_then_broadcast(fn, runtime: Runtime, root: Path, step: int, stage: str) -> bool:
    """Run `fn` (returning a bool) on rank 0 and broadcast [result, errno of an OSError it raised]; every rank
    then returns the result or raises the same CheckpointError."""
    outcome = torch.zeros(2, dtype=torch.int64, device=runtime.device)  # NCCL needs device tensors
    if runtime.is_main:
        try:
            outcome[0] = int(fn())
        except OSError as err:
            outcome[1] = err.errno or errno.EIO
    dist.broadcast(outcome, src=0)
    if outcome[1]:
        raise _save_error(root, step, stage, int(outcome[1]))
    return bool(outcome[0])


def _causes(err: BaseException):
    """`err`, its causes and, for DCP's CheckpointException, every rank's exception (in rank order)."""
    todo = [err]
    while todo:
        e = todo.pop(0)
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for _, failure in sorted(failures.items()):
                todo.extend(
                    x for x in (failure if isinstance(failure, tuple) else (failure,)) if isinstance(x, BaseException)
                )


def _first_os_error(err: BaseException) -> int:
    """The errno of the first OSError among DCP's per-rank failures (or in the cause chain); 0 if none."""
    return next((e.errno for e in _causes(err) if isinstance(e, OSError) and e.errno), 0)


def _save_error(root: Path, step: int, stage: str, code: int, err: Optional[BaseException] = None) -> CheckpointError:
    try:
        previous = latest_checkpoint(root)
    except CheckpointError:
        previous = None
    kept = (
        f"the previous checkpoint {previous.name} is intact and `latest` still names it"
        if previous
        else "no earlier checkpoint exists"
    )
    reason = f"{os.strerror(code)} [errno {code}]" if code else (str(err).strip().splitlines() or ["?"])[-1]
    return CheckpointError(f"train.out_dir: cannot {stage} checkpoint {step_name(step)} under {root}: {reason}; {kept}")


def _abandon(tmp: Path, final: Path, root: Path, runtime: Runtime) -> None:
    """After a failed save: remove what it wrote (rank 0), unless `latest` already names it."""
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer = root / LATEST
        named = pointer.is_file() and pointer.read_text().strip() == final.name
        if final.exists() and not named:
            shutil.rmtree(final, ignore_errors=True)
    dist.barrier()


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
    for path in steps[: max(0, len(steps) - (keep - 1))]:
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


def _dcp_load(state: dict, path: Path, into: str) -> None:
    """dcp.load that unpickles nothing (`checkpoint_integrity`), with one-line errors."""
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=TensorsOnlyLoadPlanner())
    except (Exception, CheckpointException) as err:  # DCP wraps per-rank failures; one line is what users need
        refused = next((e for e in _causes(err) if isinstance(e, CheckpointError)), None)
        if refused is not None:
            raise CheckpointError(f"{path}: {refused}") from None
        raise CheckpointError(f"{path}: cannot be loaded into {into}: {str(err).strip().splitlines()[-1]}") from None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, runtime: Runtime
) -> dict:
    """Restore model, optimizer, scheduler and (where saved for this rank) RNG state; returns the progress dict.
    Call `verify_checkpoint` first: this reads the files."""
    state, param_groups = _state_and_groups(
        model, optimizer, scheduler, {"step": 0, "consumed_samples": 0}, runtime, by_identity=False
    )
    reader = SafeFileSystemReader(str(path))
    saved = set(reader.read_metadata().state_dict_metadata)
    rng_key = f"rng_rank{runtime.rank}"
    if not any(key.startswith(rng_key + ".") for key in saved):
        del state[rng_key]
    _dcp_load(state, path, "this model and optimizer")

    params = dict(model.named_parameters())
    placements = expert_placements(model)

    def to_param_layout(name: str, t: DTensor) -> torch.Tensor:
        """Back to the parameter's own kind: a plain tensor, or a DTensor like FSDP2's (moments share its spec),
        holding the experts of the layer's placement."""
        like = params[name]
        if not isinstance(like, DTensor):
            return _from_contiguous(placements.get(name), t.to_local(), runtime)
        local = DTensor.from_local(
            t.to_local(), like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
        )
        if name not in placements:
            return local
        return DTensor.from_local(
            _from_contiguous(placements[name], local, runtime),
            like.device_mesh,
            like.placements,
            run_check=False,
            shape=like.shape,
            stride=like.stride(),
        )

    _map_experts(state["model"], state["optim"], expert_names(model), to_param_layout)
    state["optim"]["param_groups"] = param_groups
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _load_scheduler_state(scheduler, state["scheduler"])
    if rng_key in state:
        _set_rng_state(state[rng_key], runtime.device)
    return {key: int(value) for key, value in state["progress"].items()}


def _from_contiguous(placement: Optional[Placement], t: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if placement is None:
        return t
    return move_experts(
        t, Placement.contiguous(placement.num_experts, placement.num_devices), placement, runtime.groups.ep_group
    )


def load_model_weights(path: Path, model: nn.Module, runtime: Runtime) -> None:
    """Restore only the model's weights (for evaluation and generation: no optimizer is built), in whatever
    layout `model` has now (this rank's expert slice under expert parallelism)."""
    verify_checkpoint(path, runtime.device)  # collective, like the load
    experts = expert_names(model)
    model_sd = get_model_state_dict(model)
    _map_experts(model_sd, {}, experts, lambda name, t: _saved_expert(t, runtime))
    state = {"model": model_sd}
    _dcp_load(state, path, "this model")
    _map_experts(state["model"], {}, experts, lambda name, t: t.to_local())
    set_model_state_dict(model, state["model"])


def describe(path: Path) -> str:
    meta = read_meta(path)
    return (
        f"{path} (step {meta.get('step')}, saved by {meta.get('world_size')} rank(s), "
        f"expert-parallel size {meta.get('expert_parallel_size')})"
    )
