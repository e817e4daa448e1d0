"""Timing and memory helpers shared by the benchmarks: interleaved rounds, median times, saved-activation bytes."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def saved_bytes_counter(exclude: Iterable[torch.Tensor] = ()) -> Iterator[list[int]]:
    """Count the bytes autograd keeps for backward (each storage once, the `exclude`d ones, e.g. the parameters,
    not at all): the activation memory a step holds."""
    seen: dict[int, int] = {t.untyped_storage().data_ptr(): 0 for t in exclude}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and storage.nbytes():
            seen[key] = storage.nbytes()
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


class _OutputRecorder(TorchDispatchMode):
    """Calls `note` on every tensor an operator returns."""

    def __init__(self, note: Callable[[torch.Tensor], None]):
        super().__init__()
        self.note = note

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.note(leaf)
        return out


@contextmanager
def kept_bytes_counter(exclude: Iterable[torch.Tensor] = ()) -> Iterator[Callable[[], int]]:
    """What a forward keeps for backward, whoever keeps it: yields `kept()`, which (called once the forward's
    outputs other than the loss are dropped, before backward) returns the bytes of the storages still alive among
    those autograd saved and those any operator of the forward produced. Unlike `saved_bytes_counter` it also sees
    what activation checkpointing keeps outside autograd's saved tensors: a checkpointed region's inputs and the
    outputs a selective policy stores. Each storage counts once; the `exclude`d ones (the parameters) not at all."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, tuple] = {}

    def note(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in excluded or not storage.nbytes() or t.device.type == "meta":
            return
        old = seen.get(key)
        if old is not None and not torch.UntypedStorage._expired(old[0]):
            return
        seen[key] = (storage._weak_ref(), storage.nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    def kept() -> int:
        gc.collect()
        return sum(n for ref, n in seen.values() if not torch.UntypedStorage._expired(ref))

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _OutputRecorder(note):
        yield kept


def step_memory(step: Callable[[], torch.Tensor], device: torch.device, params: Iterable[torch.Tensor] = ()) -> dict:
    """Memory of one forward+backward: activation bytes saved for backward (parameters not counted), and on CUDA
    the allocator's peak above what was allocated before the step."""
    out = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with saved_bytes_counter(exclude=params) as saved:
        loss = step()
    out["saved_bytes"] = saved[0]
    loss.backward()
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return out


def interleaved_samples(
    steps: dict[str, Callable[[], None]], iters: int, rounds: int, device: torch.device, progress=None
) -> dict[str, list[float]]:
    """Seconds per call of each step in each round; the rounds alternate the steps so that drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                step()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / iters)
            if progress is not None:
                progress.update(1)
    return samples


def interleaved_times(
    steps: dict[str, Callable[[], None]], iters: int, rounds: int, device: torch.device, progress=None
) -> dict[str, float]:
    """Median seconds per call of each step, measured in alternating rounds so that drift hits all alike."""
    samples = interleaved_samples(steps, iters, rounds, device, progress)
    return {name: statistics.median(times) for name, times in samples.items()}


def paired_speedup(samples: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float]:
    """How much faster `a` runs than `b` (b's time over a's), as the median over rounds of the ratio within each
    round, and its smallest and largest round: on a shared machine whose speed drifts by ±15% over seconds, two
    steps timed back to back see the same machine, so their ratio is steadier than a ratio of medians."""
    ratios = sorted(tb / ta for ta, tb in zip(samples[a], samples[b]))
    return statistics.median(ratios), ratios[0], ratios[-1]
