"""Run `fn(rank, world, *args)` in `world` local gloo processes and collect the results: the one launcher every
distributed test and the dispatch benchmark use (training goes through torchrun instead)."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn, args, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"{rank}.pt")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(world: int, fn, *args, threads: int = 1) -> list:
    """Results of `fn` on every rank, in rank order; a failure on any rank raises with its traceback."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_worker, args=(world, _free_port(), out_dir, fn, args, threads), nprocs=world, join=True)
        except Exception as err:
            messages = []
            for rank in range(world):
                path = Path(out_dir) / f"{rank}.pt"
                if path.exists():
                    payload = torch.load(path, weights_only=False)
                    if not payload["ok"]:
                        messages.append(f"rank {rank}:\n{payload['error']}")
            raise RuntimeError("\n".join(messages) or str(err)) from None
        return [torch.load(Path(out_dir) / f"{r}.pt", weights_only=False)["result"] for r in range(world)]
