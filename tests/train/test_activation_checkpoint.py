"""Activation checkpointing changes memory, never results: under every mode, scorer and dispatcher the loss and
every gradient equal the run without it, and the load statistics and byte counters are counted once."""

from __future__ import annotations

import itertools

import pytest
import torch

from aoe_ep.config import ConfigError, load_config
from aoe_ep.model import Decoder, token_cross_entropy
from aoe_ep.moe import MoELayer
from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train.activation_checkpoint import apply_activation_checkpointing, checkpoint_entries
from tests.train.synthetic import BUILDERS, small_config

MODES = ("selective", "full")
SCORERS = ("aoe", "router")
SMALL = [
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.vocab_size=64",
    "model.max_seq_len=16",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.d_ffn=24",
    "moe.d_low=8",
    "data.seq_len=16",
]


def _step(cfg, mode: str, tokens_BS: torch.Tensor, ep_group=None, every: int = 1) -> dict:
    """Loss, every gradient, each MoE layer's statistics and byte counts, and how often each MoE layer ran."""
    torch.manual_seed(7)
    model = Decoder(cfg.model, cfg.moe, ep_group=ep_group)
    apply_activation_checkpointing(model, mode, every)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    runs = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    out = model(tokens_BS)
    ce_sum, count = token_cross_entropy(out.logits, tokens_BS.roll(-1, 1), torch.ones(tokens_BS.shape))
    loss = ce_sum / count + out.aux_loss
    loss.backward()
    return {
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "stats": [vars(info.stats) for info in out.moe],
        "bytes": [layer.dispatcher.counter.as_dict() for layer in layers],
        "runs": runs,
    }


def _assert_same(got: dict, want: dict, where: str) -> None:
    assert torch.equal(got["loss"], want["loss"]), where
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        assert torch.equal(got["grads"][name], grad), f"{where}: gradient of {name}"
    for got_layer, want_layer in zip(got["stats"], want["stats"], strict=True):
        for field, value in want_layer.items():
            mine = got_layer[field]
            same = torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value
            assert same, f"{where}: load statistic {field}"
    assert got["bytes"] == want["bytes"], f"{where}: byte counters"


@pytest.mark.parametrize("scorer", SCORERS)
def test_one_device_checkpointing_equals_the_plain_run(scorer):
    cfg = load_config("tiny", SMALL + [f"moe.scorer={scorer}"])
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    want = _step(cfg, "none", tokens)
    assert want["runs"] == [1, 1]
    for mode in MODES:
        got = _step(cfg, mode, tokens)
        _assert_same(got, want, f"{scorer}/{mode}")
        # full recomputes the MoE layers in backward; selective never runs them twice
        assert got["runs"] == ([2, 2] if mode == "full" else [1, 1]), mode


def test_every_nth_block_and_the_dense_ffn():
    cfg = load_config("tiny", SMALL + ["model.ffn=dense", "model.d_ffn=48", "model.n_layers=3"])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    want = _step(cfg, "none", tokens)
    for mode, every in itertools.product(MODES, (1, 2)):
        _assert_same(_step(cfg, mode, tokens, every=every), want, f"dense/{mode}/every {every}")
    model = Decoder(cfg.model)
    entries = apply_activation_checkpointing(model, "full", 2)
    assert entries == [model.blocks[0], model.blocks[2]]
    model = Decoder(cfg.model)
    entries = apply_activation_checkpointing(model, "selective", 3)
    block = model.blocks[0]
    assert set(map(id, entries)) == {id(block.attn_norm), id(block.ffn_norm), id(block.ffn)}
    assert [b.attn.recompute_activations for b in model.blocks] == [True, False, False]
    assert checkpoint_entries(Decoder(cfg.model)) == []


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_selective_recomputes_the_chosen_experts_pre_activations(kernel):
    """Every other block of three: the chosen blocks' experts recompute x·Wg and x·Wp in backward, bit for bit."""
    cfg = load_config("tiny", SMALL + ["model.n_layers=3", f"moe.expert_kernel={kernel}"])
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(3))
    want = _step(cfg, "none", tokens)
    _assert_same(_step(cfg, "selective", tokens, every=2), want, f"{kernel}/selective/every 2")
    model = Decoder(cfg.model, cfg.moe)
    apply_activation_checkpointing(model, "selective", 2)
    assert [block.ffn.experts.recompute_activations for block in model.blocks] == [True, False, True]
    model = Decoder(cfg.model, cfg.moe)
    apply_activation_checkpointing(model, "full")
    assert not any(block.ffn.experts.recompute_activations for block in model.blocks)


def test_no_checkpoint_without_backward():
    """Evaluation and generation run the plain forward: no gradient, or a KV cache."""
    cfg = load_config("tiny", SMALL)
    model = Decoder(cfg.model, cfg.moe)
    apply_activation_checkpointing(model, "full")
    layer = model.blocks[0].ffn
    runs = []
    layer.register_forward_hook(lambda *_: runs.append(1))
    tokens = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        model(tokens)
    model.eval()
    cache = model.new_cache(1)
    model(tokens, cache)
    assert len(runs) == 2


def _ep_worker(rank: int, world: int) -> dict:
    from aoe_ep.parallel.groups import initialize_groups

    groups = initialize_groups(world)
    out = {}
    tokens = torch.randint(0, 64, (2 + rank, 16), generator=torch.Generator().manual_seed(10 + rank))
    for dispatcher, scorer in itertools.product(("allgather", "alltoall"), SCORERS):
        cfg = load_config(
            "tiny", SMALL + [f"moe.scorer={scorer}", f"moe.dispatcher={dispatcher}", "parallel.expert_parallel_size=2"]
        )
        want = _step(cfg, "none", tokens, groups.ep_group)
        assert sum(sum(b.values()) for b in want["bytes"]) > 0
        for mode in MODES:
            got = _step(cfg, mode, tokens, groups.ep_group)
            _assert_same(got, want, f"rank {rank} {dispatcher}/{scorer}/{mode}")
            out[(dispatcher, scorer, mode)] = got["runs"]
    return out


def test_expert_parallel_checkpointing_equals_the_plain_run():
    for runs in run_distributed(2, _ep_worker):
        assert len(runs) == 8
        assert all(r == ([2, 2] if mode == "full" else [1, 1]) for (_, _, mode), r in runs.items())


def test_trainer_with_checkpointing_trains_alike(tmp_path):
    """Two micro-batches per step (gradient accumulation), three steps: the same losses, bit for bit."""
    from aoe_ep.train.trainer import Trainer

    losses = {}
    for mode in ("none", "full", "selective"):
        cfg = small_config(
            tmp_path / mode,
            "model.n_layers=2",
            "train.max_steps=3",
            "train.eval_at_start=false",
            "train.eval_interval=100",
            "train.save_interval=100",
            f"train.activation_checkpointing={mode}",
        )
        with Trainer(cfg, data=BUILDERS) as trainer:
            losses[mode] = [(r.loss, r.aux_loss, r.grad_norm) for r in trainer.fit().history]
            if mode != "none":
                assert checkpoint_entries(trainer.dp.model)
    assert losses["full"] == losses["none"]
    assert losses["selective"] == losses["none"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.activation_checkpointing=partial", "train.activation_checkpointing"),
        ("train.activation_checkpointing=1", "train.activation_checkpointing"),
        ("train.ac_every=0", "train.ac_every"),
        ("train.compile=maybe", "train.compile"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        load_config("tiny", [override])


def test_compile_does_not_take_selective():
    with pytest.raises(ConfigError, match="^train.compile:.*selective"):
        load_config("tiny", ["train.compile=true", "train.activation_checkpointing=selective"])


def _fsdp_worker(rank: int, world: int, tmp_path) -> dict:
    from aoe_ep.train.trainer import Trainer

    out = {}
    for mode in ("none", "full", "selective"):
        cfg = small_config(
            tmp_path / mode,
            "model.n_layers=2",
            "train.max_steps=2",
            "train.eval_at_start=false",
            "train.eval_interval=100",
            "train.save_interval=100",
            "parallel.expert_parallel_size=2",
            "moe.dispatcher=alltoall",
            "train.dense_parallel=fsdp",
            "train.micro_batch_size=1",
            f"train.activation_checkpointing={mode}",
        )
        with Trainer(cfg, data=BUILDERS) as trainer:
            out[mode] = [(r.loss, r.aux_loss, r.grad_norm) for r in trainer.fit().history]
    return out


def test_checkpointing_under_fsdp2_and_expert_parallelism(tmp_path):
    """EP 2 with alltoall and FSDP2 for the dense weights, two micro-batches per step: the same losses and norms."""
    for losses in run_distributed(2, _fsdp_worker, tmp_path):
        assert losses["full"] == pytest.approx(losses["none"], rel=1e-6)
        assert losses["selective"] == pytest.approx(losses["none"], rel=1e-6)
