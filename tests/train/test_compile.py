"""train.compile: compiled blocks train like eager ones, and a machine that cannot compile is told so at start-up."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from aoe_ep.config import ConfigError, load_config
from aoe_ep.model import Decoder, DecoderBlock, token_cross_entropy
from aoe_ep.parallel.spawn import run_distributed
from aoe_ep.train import compile as compile_module
from aoe_ep.train.trainer import Trainer
from tests.train.synthetic import BUILDERS, small_config


def _losses(tmp_path, *overrides: str) -> list[float]:
    """Each step's loss and aux loss, in turn (flat: `pytest.approx` compares nested tuples exactly)."""
    cfg = small_config(
        tmp_path,
        "model.n_layers=2",
        "train.max_steps=3",
        "train.eval_at_start=false",
        "train.eval_interval=100",
        "train.save_interval=100",
        *overrides,
    )
    with Trainer(cfg, data=BUILDERS) as trainer:
        methods = compile_module.compiled_methods(trainer.dp.model)
        # two blocks: each block's norms and attention (`mix`) and its MoE layer's gating
        assert [name for _, name in methods] == ["mix", "gate"] * 2
        assert [compile_module.is_compiled(*m) for m in methods] == [cfg.train.compile] * 4
        return [value for r in trainer.fit().history for value in (r.loss, r.aux_loss)]


def test_compiled_blocks_train_like_eager(tmp_path):
    """The tiny AoE model, with full checkpointing around the compiled pieces: losses within fp32 tolerance."""
    torch._dynamo.reset()
    eager = _losses(tmp_path / "eager", "train.activation_checkpointing=full")
    compiled = _losses(tmp_path / "compiled", "train.activation_checkpointing=full", "train.compile=true")
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_a_machine_that_cannot_compile_stops_at_start_up(tmp_path, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(compile_module.torch, "compile", no_compiler)
    cfg = small_config(tmp_path, "train.compile=true")
    with pytest.raises(ConfigError, match=r"^train.compile: this machine cannot compile for cpu \(OSError: no C\+\+"):
        Trainer(cfg, data=BUILDERS)


def test_compiled_router_model_matches_eager_and_decodes_eagerly():
    """A router-scored MoE decoder with a dense block: compiled `mix`, dense FFN and MoE gating give eager's loss, aux
    loss and every gradient within fp32 tolerance; in eval mode with a KV cache (generation) nothing is traced."""
    cfg = load_config(
        "tiny",
        ["model.d_model=32", "model.n_heads=2", "model.max_seq_len=16", "moe.d_model=32", "moe.scorer=router"],
    )
    torch.manual_seed(0)
    eager = Decoder(cfg.model, cfg.moe)
    eager.blocks[1] = DecoderBlock(dataclasses.replace(cfg.model, ffn="dense", d_ffn=64), None)
    compiled = copy.deepcopy(eager)
    methods = compile_module.compile_blocks(compiled, torch.device("cpu"))
    assert [name for _, name in methods] == ["mix", "gate", "mix", "forward"]
    assert all(compile_module.is_compiled(*m) for m in methods)
    tokens_BS = torch.randint(0, cfg.model.vocab_size, (2, 16))
    frames = torch._dynamo.utils.counters["frames"]["total"]
    for model in (eager, compiled):
        out = model(tokens_BS)
        ce_sum, count = token_cross_entropy(out.logits, tokens_BS.roll(-1, 1), torch.ones(2, 16))
        (ce_sum / count + out.aux_loss).backward()
        model.result = torch.stack([ce_sum / count, out.aux_loss, out.moe[0].stats.ent_conf.float()]).detach()
    assert torch.allclose(compiled.result, eager.result, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["frames"]["total"] > frames  # the training step ran compiled
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6), name

    eager.eval(), compiled.eval()
    frames = torch._dynamo.utils.counters["frames"]["total"]
    with torch.no_grad():
        caches = [model.new_cache(1) for model in (eager, compiled)]
        for prompt in (tokens_BS[:1, :5], tokens_BS[:1, 5:6], tokens_BS[:1, 6:7]):
            want, got = (model(prompt, cache).logits for model, cache in zip((eager, compiled), caches))
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["frames"]["total"] == frames  # nothing traced while decoding


LAYOUTS = {
    "DDP x EP 2, all-to-all": (
        "parallel.expert_parallel_size=2",
        "moe.dispatcher=alltoall",
        "train.dense_parallel=ddp",
    ),
    "FSDP2, EP 1": ("parallel.expert_parallel_size=1", "train.dense_parallel=fsdp"),
}


def _layout_worker(rank: int, world: int, tmp_path) -> dict:
    out = {}
    for name, layout in LAYOUTS.items():
        for compiled in (False, True):
            cfg = small_config(
                tmp_path / f"{name.split(',')[0]}_{compiled}",
                "model.n_layers=2",
                "train.max_steps=3",
                "train.eval_at_start=false",
                "train.eval_interval=100",
                "train.save_interval=100",
                f"train.compile={str(compiled).lower()}",
                *layout,
            )
            with Trainer(cfg, data=BUILDERS) as trainer:
                pieces = [
                    m for m in compile_module.compiled_methods(trainer.dp.model) if compile_module.is_compiled(*m)
                ]
                history = [(r.loss, r.aux_loss, r.grad_norm) for r in trainer.fit().history]
            out[(name, compiled)] = ([name for _, name in pieces], [v for step in history for v in step])
    return out


def test_compiled_blocks_under_data_and_expert_parallelism(tmp_path):
    """On 2 gloo ranks, DDP with EP 2 (the gating runs eagerly: its batch sums are collectives) and FSDP2 with every
    expert local (the gating compiled): loss, aux loss and gradient norm of each step within fp32 tolerance of
    eager, on every rank."""
    results = run_distributed(2, _layout_worker, tmp_path)
    for rank, got in enumerate(results):
        assert got[("DDP x EP 2, all-to-all", True)][0] == ["mix", "mix"]
        assert got[("FSDP2, EP 1", True)][0] == ["mix", "gate", "mix", "gate"]
        for name in LAYOUTS:
            assert got[(name, False)][0] == []
            eager, compiled = got[(name, False)][1], got[(name, True)][1]
            assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6), f"rank {rank}, {name}"
