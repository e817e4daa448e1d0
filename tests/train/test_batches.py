"""Which samples each rank reads: a step's micro-batches over all ranks cover [consumed, consumed + B) exactly once,
whatever the number of ranks, and impossible batch layouts are ConfigErrors naming the field."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.config import ConfigError, load_config
from aoe_ep.train.batches import collate, plan_batches
from tests.train.synthetic import SyntheticDataset


def _cfg(*overrides: str):
    return load_config(
        "tiny", ["data.seq_len=16", "train.global_batch_tokens=384", "train.micro_batch_size=2", *overrides]
    )


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_a_step_reads_each_sample_of_its_global_batch_once(world):
    plans = [plan_batches(_cfg(), world, rank) for rank in range(world)]
    assert plans[0].global_samples == 24 and plans[0].tokens_per_step == 384
    assert plans[0].num_micro_batches == 24 // (2 * world)
    consumed = 48  # the start of step 2
    seen = [i for plan in plans for micro in range(plan.num_micro_batches) for i in plan.indices(consumed, micro)]
    assert sorted(seen) == list(range(48, 72))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.global_batch_tokens=100"], "train.global_batch_tokens: 100 is not a multiple of data.seq_len=16"),
        (["train.micro_batch_size=5"], "train.global_batch_tokens: 384 tokens = 24 sequences of 16, not divisible"),
        (["data.seq_len=256", "train.global_batch_tokens=512"], "data.seq_len: 256 exceeds model.max_seq_len=128"),
    ],
)
def test_impossible_layouts_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match="^" + field.replace(".", r"\.").replace("=", "=")):
        plan_batches(_cfg(*overrides), 1, 0)


def test_collate_stacks_items():
    ds = SyntheticDataset(seq_len=16, num_samples=10, seed=3, salt=0)
    batch = collate(ds, range(4, 7), torch.device("cpu"))
    assert batch.tokens.shape == (3, 16) and batch.tokens.dtype == torch.long
    assert torch.equal(batch.tokens[1], ds[5]["tokens"]) and torch.equal(batch.labels[2], ds[6]["labels"])
    assert batch.loss_mask.dtype == torch.float32
