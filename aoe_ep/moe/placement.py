"""Expert placement: which global experts each rank of an expert-parallel group holds (`parallel.expert_placement`).

Experts keep their identity (their parameters, statistics and checkpoint entries are those of global expert i);
a placement only decides the rank that computes them. `contiguous` gives rank r the experts [r·n/EP, (r+1)·n/EP);
`balanced` chooses, from a measured load per expert, the partition into EP groups of n/EP experts whose per-device
loads have the smallest max − min (the per-device term of the idle-time metric, docs/design.md section 1).

The partition problem is NP-hard in general, so `balanced_placement` is exact where exhaustive search is cheap
(at most `EXACT_LIMIT` partitions: e.g. 8 experts over 2 or 4 ranks, 12 over 2, 3 or 4, 16 over 2) and otherwise
greedy: LPT (experts by decreasing load, each to the lightest device that still has room), then pairwise swaps
between two devices while a swap lowers (max − min, Σ device load²) lexicographically; a strict decrease each round
ends the search, and the result is then a placement no single swap improves. Ties break towards lower expert and
device indices, so every rank computes the same placement from the same counts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

EXACT_LIMIT = 20_000  # partitions searched exhaustively (about a second of Python at the limit)


@dataclass(frozen=True)
class Placement:
    """experts[r]: the global experts rank r holds, in the order of its local expert stack (ascending)."""

    experts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        flat = [e for held in self.experts for e in held]
        sizes = {len(held) for held in self.experts}
        if not self.experts or len(sizes) != 1 or sorted(flat) != list(range(len(flat))):
            raise ValueError(
                f"an expert placement gives every rank the same number of distinct experts 0..n-1, "
                f"got {[list(h) for h in self.experts]}"
            )
        if any(list(held) != sorted(held) for held in self.experts):
            raise ValueError(
                f"an expert placement lists each rank's experts in ascending order, "
                f"got {[list(h) for h in self.experts]}"
            )

    @classmethod
    def contiguous(cls, num_experts: int, num_devices: int) -> Placement:
        if num_devices < 1 or num_experts % num_devices:
            raise ValueError(f"{num_experts} experts cannot be split over {num_devices} devices")
        k = num_experts // num_devices
        return cls(tuple(tuple(range(r * k, (r + 1) * k)) for r in range(num_devices)))

    @classmethod
    def of(cls, experts: Sequence[Sequence[int]]) -> Placement:
        """From lists (a checkpoint's metadata); each rank's experts are sorted."""
        return cls(tuple(tuple(sorted(int(e) for e in held)) for held in experts))

    @property
    def num_devices(self) -> int:
        return len(self.experts)

    @property
    def num_experts(self) -> int:
        return sum(len(held) for held in self.experts)

    @property
    def is_contiguous(self) -> bool:
        return self == Placement.contiguous(self.num_experts, self.num_devices)

    @property
    def order(self) -> list[int]:
        """Global expert of each placed slot: rank 0's experts, then rank 1's, ..."""
        return [e for held in self.experts for e in held]

    @property
    def position(self) -> list[int]:
        """Placed slot of each global expert (the inverse of `order`)."""
        pos = [0] * self.num_experts
        for slot, e in enumerate(self.order):
            pos[e] = slot
        return pos

    def device_load(self, load_E: torch.Tensor) -> torch.Tensor:
        """Σ of the load of each device's experts, [num_devices]."""
        if load_E.numel() != self.num_experts:
            raise ValueError(f"a load of {load_E.numel()} experts does not fit a placement of {self.num_experts}")
        index = torch.tensor(self.order, dtype=torch.int64, device=load_E.device)
        return load_E.index_select(0, index).view(self.num_devices, -1).sum(dim=1)

    def spread(self, load_E: torch.Tensor) -> float:
        """max − min of the per-device load."""
        dev = self.device_load(load_E.double())
        return float(dev.max() - dev.min())

    def as_lists(self) -> list[list[int]]:
        return [list(held) for held in self.experts]


def _objective(device_loads: Sequence[float]) -> tuple[float, float]:
    return max(device_loads) - min(device_loads), sum(v * v for v in device_loads)


def _num_partitions(num_experts: int, num_devices: int) -> int:
    """Unordered partitions of n experts into EP groups of n/EP."""
    k = num_experts // num_devices
    return math.factorial(num_experts) // (math.factorial(k) ** num_devices * math.factorial(num_devices))


def _exact(load: list[float], num_devices: int) -> list[list[int]]:
    """Every partition (the group holding the lowest unplaced expert is chosen first, so each appears once)."""
    n, k = len(load), len(load) // num_devices
    best: list = [None, None]

    def search(left: list[int], groups: list[tuple[int, ...]]) -> None:
        if not left:
            key = _objective([sum(load[e] for e in g) for g in groups])
            if best[0] is None or key < best[0]:
                best[0], best[1] = key, list(groups)
            return
        first, rest = left[0], left[1:]
        for others in itertools.combinations(rest, k - 1):
            group = (first, *others)
            search([e for e in rest if e not in others], groups + [group])

    search(list(range(n)), [])
    return [list(g) for g in best[1]]


def _greedy(load: list[float], num_devices: int) -> list[list[int]]:
    n, k = len(load), len(load) // num_devices
    groups: list[list[int]] = [[] for _ in range(num_devices)]
    sums = [0.0] * num_devices
    for e in sorted(range(n), key=lambda e: (-load[e], e)):  # LPT under the n/EP-per-device constraint
        d = min((d for d in range(num_devices) if len(groups[d]) < k), key=lambda d: (sums[d], d))
        groups[d].append(e)
        sums[d] += load[e]
    while True:  # the best single swap between two devices, while one improves the objective
        current = _objective(sums)
        best = None
        for a, b in itertools.combinations(range(num_devices), 2):
            for i, ea in enumerate(groups[a]):
                for j, eb in enumerate(groups[b]):
                    delta = load[eb] - load[ea]
                    trial = list(sums)
                    trial[a] += delta
                    trial[b] -= delta
                    key = _objective(trial)
                    if key < current and (best is None or key < best[0]):
                        best = (key, a, i, b, j, trial)
        if best is None:
            return groups
        _, a, i, b, j, sums = best
        groups[a][i], groups[b][j] = groups[b][j], groups[a][i]


def balanced_placement(
    load_E: torch.Tensor | Sequence[float], num_devices: int, exact_limit: int = EXACT_LIMIT
) -> Placement:
    """The placement of n experts over `num_devices` ranks (n/EP each) with the smallest per-device max − min of
    `load_E` (token counts or fractions): exhaustive below `exact_limit` partitions, else LPT + pairwise swaps.
    Devices are ordered by their lowest expert, so an already balanced contiguous split stays contiguous."""
    load = [float(v) for v in (load_E.tolist() if isinstance(load_E, torch.Tensor) else load_E)]
    n = len(load)
    if num_devices < 1 or n % num_devices:
        raise ValueError(f"{n} experts cannot be split over {num_devices} devices")
    if any(not math.isfinite(v) or v < 0 for v in load):
        raise ValueError(f"expert loads must be finite and non-negative, got {load}")
    if num_devices == 1:
        return Placement.contiguous(n, 1)
    contiguous = Placement.contiguous(n, num_devices)
    exact = _num_partitions(n, num_devices) <= exact_limit
    groups = _exact(load, num_devices) if exact else _greedy(load, num_devices)
    found = Placement.of(sorted((sorted(g) for g in groups), key=lambda g: g[0]))
    # Keep the contiguous split when it is as good: moving experts for no gain only costs a reshard.
    ours = _objective(found.device_load(torch.tensor(load, dtype=torch.float64)).tolist())
    theirs = _objective(contiguous.device_load(torch.tensor(load, dtype=torch.float64)).tolist())
    return contiguous if theirs[0] <= ours[0] else found
