"""Rank 0 first: one process writes a shared file (a tokenized corpus, a compiled helper) while the others wait.

Like megatron-core's dataset builder, this assumes `data.cache_dir` lies on a filesystem every rank can read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def on_rank0_first(build: Callable[[], T], use: Callable[[], T]) -> T:
    """Run `build` on rank 0, then, after a barrier, `use` on the other ranks (it only reads what rank 0 wrote).

    Without torch.distributed this is `build()`. Rank 0 reaches the barrier even when `build` fails, so the other
    ranks are not left waiting; they then fail in `use` with their own message.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return build()
    if dist.get_rank() == 0:
        try:
            result = build()
        finally:
            dist.barrier()
        return result
    dist.barrier()
    return use()
