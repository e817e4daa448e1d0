"""Open a training checkpoint for inference: its config, a model with only its weights restored, its tokenizer.

    with open_checkpoint("runs/tiny") as loaded:       # a run directory (its newest checkpoint) or a checkpoint
        logits = loaded.model(tokens_BS).logits

The model is built as the trainer builds it (same config, same process groups), so that under torchrun with the
checkpoint's expert-parallel size every rank holds the experts it held in training and computes what it computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from aoe_ep.config import Config, config_from_dict
from aoe_ep.model import Decoder
from aoe_ep.moe import MoELayer
from aoe_ep.parallel.runtime import Runtime, setup_runtime, teardown
from aoe_ep.train import checkpoint as ckpt


@dataclass
class LoadedCheckpoint:
    path: Path
    cfg: Config
    meta: dict
    model: Decoder
    runtime: Runtime

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.model.modules() if isinstance(m, MoELayer)]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def find_checkpoint(spec: str | Path) -> Path:
    """A checkpoint directory, a run directory (its `checkpoints/latest`) or a checkpoints root (its `latest`)."""
    path = Path(spec)
    if ckpt.is_complete(path):
        return path
    for root in (ckpt.checkpoint_root(path), path):
        if (root / ckpt.LATEST).is_file():
            return ckpt.latest_checkpoint(root)
    raise ckpt.CheckpointError(
        f"--checkpoint {spec}: neither a complete checkpoint directory (with .metadata and "
        f"meta.json) nor a run directory with checkpoints/latest"
    )


def read_config(path: Path) -> Config:
    return config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))


def choose_expert_parallel_size(saved: int, world_size: int, asked: Optional[int]) -> int:
    """The asked size, else the checkpoint's when it divides the world (its training layout), else 1."""
    if asked is not None:
        return asked
    return saved if world_size % saved == 0 else 1


@contextlib.contextmanager
def open_checkpoint(
    spec: str | Path, expert_parallel_size: Optional[int] = None, device: Optional[str] = None
) -> Iterator[LoadedCheckpoint]:
    """Build the checkpoint's model on this process (or every rank under torchrun) and restore its weights.
    `expert_parallel_size` None: the checkpoint's when the world size allows it; `device` None: the config's."""
    import torch.distributed as dist

    path = find_checkpoint(spec)
    cfg = read_config(path)
    if device is not None:
        cfg.train.device = device
    world = dist.get_world_size() if dist.is_initialized() else _env_world_size()
    ep = choose_expert_parallel_size(cfg.parallel.expert_parallel_size, world, expert_parallel_size)
    cfg.parallel.expert_parallel_size = ep
    cfg.validate()
    runtime = setup_runtime(cfg.train, ep)
    try:
        torch.manual_seed(cfg.train.seed)
        with torch.device(runtime.device):
            model = Decoder(cfg.model, cfg.moe, ep_group=runtime.groups.ep_group)
        ckpt.load_model_weights(path, model, runtime)
        _refuse_nonfinite(path, model, runtime)
        model.eval()
        yield LoadedCheckpoint(path=path, cfg=cfg, meta=ckpt.read_meta(path), model=model, runtime=runtime)
    finally:
        teardown(runtime)


def _refuse_nonfinite(path: Path, model: torch.nn.Module, runtime) -> None:
    """Collective: a checkpoint with NaN or inf weights is refused in one line (every rank together)."""
    from aoe_ep.parallel.runtime import all_reduce_

    bad = [
        name
        for name, p in model.named_parameters()
        if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
    ]
    if all_reduce_(torch.tensor([len(bad)], device=runtime.device)).item():
        where = f" (first on this rank: {bad[0]})" if bad else ""
        raise ckpt.CheckpointError(f"{path}: the weights hold NaN or inf{where}; use an earlier checkpoint")


def _env_world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))
