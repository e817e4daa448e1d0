"""Expert placement: the balanced partition against brute force on small cases, the greedy search's guarantees on
larger ones, and per-device load under a placement."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from aoe_ep.moe import LoadStats, idle_time
from aoe_ep.moe.placement import Placement, balanced_placement


def _brute_force_spread(load: list[float], devices: int) -> float:
    """min over every assignment of n/EP experts per device of (max - min) device load, written from the
    definition (all EP^n labelings, the balanced ones kept)."""
    n, k = len(load), len(load) // devices
    best = float("inf")
    for labels in itertools.product(range(devices), repeat=n):
        if any(labels.count(d) != k for d in range(devices)):
            continue
        sums = [sum(v for v, d in zip(load, labels) if d == dev) for dev in range(devices)]
        best = min(best, max(sums) - min(sums))
    return best


def _spread(placement: Placement, load: list[float]) -> float:
    sums = [sum(load[e] for e in held) for held in placement.experts]
    return max(sums) - min(sums)


CASES = [(n, ep, seed) for n, ep in ((4, 2), (6, 2), (8, 2), (6, 3), (8, 4)) for seed in range(4)]


@pytest.mark.parametrize("n,ep,seed", CASES)
def test_balanced_is_the_brute_force_optimum(n, ep, seed):
    rng = random.Random(seed * 100 + n * 10 + ep)
    load = [float(rng.randint(0, 50) ** 2) for _ in range(n)]  # skewed, with ties now and then
    placement = balanced_placement(load, ep)
    assert sorted(e for held in placement.experts for e in held) == list(range(n))
    assert all(len(held) == n // ep for held in placement.experts)
    assert _spread(placement, load) == pytest.approx(_brute_force_spread(load, ep), abs=1e-9)


@pytest.mark.parametrize("n,ep,seed", [(8, 2, 0), (8, 4, 1), (12, 3, 2), (12, 4, 3)])
def test_greedy_search_is_locally_optimal_and_near_the_optimum(n, ep, seed):
    rng = random.Random(seed)
    load = [rng.random() ** 3 for _ in range(n)]
    greedy = balanced_placement(load, ep, exact_limit=0)
    spread = _spread(greedy, load)
    contiguous = Placement.contiguous(n, ep)
    assert spread <= _spread(contiguous, load) + 1e-12
    if n <= 8:  # brute force is cheap here: LPT + swaps lands within one expert's load of the optimum
        assert spread <= _brute_force_spread(load, ep) + max(load) + 1e-12
    sums = [sum(load[e] for e in held) for held in greedy.experts]
    key = (max(sums) - min(sums), sum(s * s for s in sums))
    for a, b in itertools.combinations(range(ep), 2):  # no single swap improves the (spread, Σ²) objective
        for ea in greedy.experts[a]:
            for eb in greedy.experts[b]:
                trial = list(sums)
                trial[a] += load[eb] - load[ea]
                trial[b] -= load[eb] - load[ea]
                assert (max(trial) - min(trial), sum(s * s for s in trial)) >= (key[0] - 1e-12, key[1] - 1e-12)


def test_an_even_load_keeps_the_contiguous_split():
    assert balanced_placement([5.0] * 8, 4) == Placement.contiguous(8, 4)
    assert balanced_placement([3.0, 1.0, 1.0, 3.0], 2) == Placement.contiguous(4, 2)  # already 4 | 4
    assert balanced_placement([3.0, 3.0, 1.0, 1.0], 2).experts == ((0, 2), (1, 3))


def test_bad_placements_and_loads_are_refused():
    with pytest.raises(ValueError, match="same number of distinct experts"):
        Placement(((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="ascending"):
        Placement(((1, 0), (2, 3)))
    with pytest.raises(ValueError, match="cannot be split"):
        balanced_placement([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match="non-negative"):
        balanced_placement([1.0, -2.0], 2)


def test_device_load_and_idle_time_follow_the_placement():
    counts = torch.tensor([40, 30, 20, 10])
    stats = LoadStats.from_counts(counts, torch.tensor(0.0), torch.zeros(4), 50)
    placed = Placement.of([[0, 3], [1, 2]])
    assert stats.device_load(2).tolist() == pytest.approx([0.7, 0.3])  # contiguous when absent
    assert stats.device_load(2, placed).tolist() == pytest.approx([0.5, 0.5])
    assert float(stats.device_max_minus_min(2, placed)) == pytest.approx(0.0)
    assert idle_time([stats, stats], num_devices=2) == pytest.approx(0.8)
    assert idle_time([stats, stats], num_devices=2, placements=[placed, None]) == pytest.approx(0.4)
    assert placed.order == [0, 3, 1, 2] and placed.position == [0, 2, 3, 1]
    with pytest.raises(ValueError, match="does not describe"):
        stats.device_load(4, placed)
