"""Timing and memory helpers shared by the benchmarks: interleaved rounds, median times, saved-activation bytes."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch


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


def interleaved_samples(steps: dict[str, Callable[[], None]], iters: int, rounds: int, device: torch.device,
                        progress=None) -> dict[str, list[float]]:
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


def interleaved_times(steps: dict[str, Callable[[], None]], iters: int, rounds: int, device: torch.device,
                      progress=None) -> dict[str, float]:
    """Median seconds per call of each step, measured in alternating rounds so that drift hits all alike."""
    samples = interleaved_samples(steps, iters, rounds, device, progress)
    return {name: statistics.median(times) for name, times in samples.items()}


def paired_speedup(samples: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float]:
    """How much faster `a` runs than `b` (b's time over a's), as the median over rounds of the ratio within each
    round, and its smallest and largest round: on a shared machine whose speed drifts by ±15% over seconds, two
    steps timed back to back see the same machine, so their ratio is steadier than a ratio of medians."""
    ratios = sorted(tb / ta for ta, tb in zip(samples[a], samples[b]))
    return statistics.median(ratios), ratios[0], ratios[-1]
