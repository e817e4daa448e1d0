"""`aoe-ep bench train` runs end to end on the tiny model; its speeds are measured, so only their form is checked,
and its memory, which is exact, against the checkpointing modes' order."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.bench import train as bench_train


def test_tiny_model_side_by_side(monkeypatch):
    monkeypatch.setitem(bench_train.SHAPES, "tiny (AoE)", (2, 32))
    rows = bench_train.bench_model("tiny (AoE)", 1, torch.device("cpu"), contenders=("none", "selective", "full"))
    by = {r.contender: r for r in rows}
    assert by["none"].memory_vs_none == 1.0 and by["none"].speed_vs_none == 1.0
    assert by["full"].kept_bytes < by["selective"].kept_bytes < by["none"].kept_bytes
    assert by["full"].memory_vs_none < 0.3
    assert by["selective"].memory_vs_none <= 0.6  # the experts' pre-activations are recomputed
    assert all(r.tokens_per_s > 0 for r in rows)
    lines = bench_train.table(rows).splitlines()
    assert lines[0].split()[:2] == ["model", "contender"] and len(lines) == 4


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="^--models: 'huge'"):
        bench_train.main(["huge"], 1, "cpu", None)


def test_bf16_autocast_on_a_given_shape():
    """The dtype and shape `aoe_ep.bench.gpu_check` sets. Under bf16 autocast a forward also keeps the bf16 copies of
    the weights that its matmuls saved for backward; on 16 tokens of the tiny model they outweigh the activations, so
    `none` keeps more than in fp32 (where the weights themselves are saved, and not counted). `full` keeps least."""
    cpu = torch.device("cpu")
    fp32 = bench_train.bench_model("tiny (AoE)", 1, cpu, ("none", "full"), shape=(1, 16))
    bf16 = bench_train.bench_model("tiny (AoE)", 1, cpu, ("none", "full"), dtype=torch.bfloat16, shape=(1, 16))
    assert [r.contender for r in bf16] == ["none", "full"] and all(r.peak_bytes is None for r in bf16)
    assert bf16[0].kept_bytes > fp32[0].kept_bytes
    assert bf16[1].kept_bytes < bf16[0].kept_bytes
    with pytest.raises(ValueError, match="^dtype: must be torch.float32 or torch.bfloat16, got torch.float16"):
        bench_train.bench_model("tiny (AoE)", 1, cpu, ("none",), dtype=torch.float16, shape=(1, 16))
    with pytest.raises(ValueError, match="^contenders: must include 'none'"):
        bench_train.bench_model("tiny (AoE)", 1, cpu, ("full",), shape=(1, 16))


def test_the_compiled_contender_is_timed_compiled(monkeypatch):
    """torch.compile runs a module eagerly once it has been called under a dispatch mode (the kept-bytes counter's):
    the timed steps of `compiled` must run compiled regions."""
    from torch.profiler import profile

    regions = []
    timed = bench_train.interleaved_samples

    def spy(steps, *args, **kwargs):
        with profile() as prof:
            steps["compiled"]()
        regions.append(sum(1 for e in prof.events() if e.name.startswith("Torch-Compiled Region")))
        return timed(steps, *args, **kwargs)

    monkeypatch.setattr(bench_train, "interleaved_samples", spy)
    rows = bench_train.bench_model("tiny (AoE)", 1, torch.device("cpu"), ("none", "compiled"), shape=(1, 16))
    assert regions and regions[0] > 0
    assert rows[1].kept_bytes == rows[0].kept_bytes  # counted on its eager twin
