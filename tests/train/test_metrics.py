"""The logged MoE statistics: summed over micro-batches they equal the statistics of the concatenated batch,
computed here from the paper's definitions (load, Ent_load Eq. 7, Ent_conf Eq. 8, mean activation norm, idle time);
and the model-FLOPs count used for MFU."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.config import MoEConfig, TrainConfig, load_config
from aoe_ep.moe import MoELayer
from aoe_ep.parallel.runtime import setup_runtime, teardown
from aoe_ep.train.flops import forward_flops_per_token, peak_flops
from aoe_ep.train.metrics import MoEStatsAccumulator, moe_scalars


@pytest.fixture
def runtime():
    rt = setup_runtime(TrainConfig(), expert_parallel_size=1)
    yield rt
    teardown(rt)


def _reference(layer: MoELayer, x_TD: torch.Tensor, k: int) -> dict:
    w_down = layer.scorer.w_down.detach()
    s_TE = torch.stack([(x_TD @ w_down[i]).norm(dim=-1) for i in range(w_down.shape[0])], dim=1).double()
    top = s_TE.argsort(dim=1, descending=True, stable=True)[:, :k]
    counts = torch.zeros(s_TE.shape[1], dtype=torch.float64).index_add_(
        0, top.flatten(), torch.ones(top.numel(), dtype=torch.float64)
    )
    load = counts / counts.sum()
    p = torch.softmax(s_TE, dim=1)
    return {
        "load": load,
        "ent_load": float(-(load * load.log()).sum()),
        "ent_conf": float(-(p * p.log()).sum(dim=1).mean()),
        "score_mean": s_TE.mean(dim=0),
        "max_minus_min": float(load.max() - load.min()),
    }


def test_accumulated_stats_equal_the_concatenated_batch(runtime):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, num_experts=4, top_k=2, scorer="aoe", d_ffn=12, d_low=4)
    layers = [MoELayer(cfg), MoELayer(cfg)]
    batches = [torch.randn(2, 7, 16), torch.randn(3, 5, 16)]
    acc = MoEStatsAccumulator()
    with torch.no_grad():
        for x in batches:
            acc.add([layer(x)[1] for layer in layers])
    stats, seconds = acc.reduce(runtime)
    assert seconds.shape == (2, 2, 2) and (seconds >= 0).all()
    x_all = torch.cat([b.reshape(-1, 16) for b in batches])
    for layer, s in zip(layers, stats):
        ref = _reference(layer, x_all, k=2)
        assert s.num_tokens == 29
        torch.testing.assert_close(s.load, ref["load"])
        assert float(s.ent_load) == pytest.approx(ref["ent_load"], rel=1e-9)
        assert float(s.ent_conf) == pytest.approx(ref["ent_conf"], rel=1e-5)
        torch.testing.assert_close(s.score_mean, ref["score_mean"], rtol=1e-5, atol=0)
    assert acc.reduce(runtime) == ([], None)  # reset after a reduction

    tags = moe_scalars(stats, seconds, ep_size=2)
    refs = [_reference(layer, x_all, k=2) for layer in layers]
    assert tags["moe/idle_time"] == pytest.approx(sum(r["max_minus_min"] for r in refs))
    device_loads = [r["load"].view(2, 2).sum(dim=1) for r in refs]
    assert tags["moe/layer01/device_load"] == pytest.approx(device_loads[1].tolist())
    assert tags["moe/idle_time_device"] == pytest.approx(sum(float(d.max() - d.min()) for d in device_loads))
    assert tags["moe/layer00/score_mean"][3] == pytest.approx(float(refs[0]["score_mean"][3]), rel=1e-5)
    assert tags["moe/layer00/tokens_per_expert"] == stats[0].tokens_per_expert.tolist()
    assert sum(tags["moe/layer00/tokens_per_expert"]) == 29 * 2  # top-2
    assert tags["moe/layer01/load"] == pytest.approx(refs[1]["load"].tolist())


def test_flops_per_token_by_hand():
    cfg = load_config("paper/moe_732m")
    d, f, n, k, v, seq = 768, 3072, 8, 2, 32000, 2048
    attention = 8 * d * d + 2 * seq * d
    ffn = 2 * d * n + k * 6 * d * f
    assert forward_flops_per_token(cfg, seq) == 12 * (attention + ffn) + 2 * d * v
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), peak_tflops=100.0) == 1e14


def _ep_window(rank: int, world: int) -> dict:
    from aoe_ep.train.metrics import comm_scalars

    rt = setup_runtime(TrainConfig(), expert_parallel_size=world)
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, num_experts=4, top_k=2, d_ffn=8, d_low=4, dispatcher="alltoall")
    full = [MoELayer(cfg), MoELayer(cfg)]
    layers = []
    for ref in full:
        layer = MoELayer(cfg, ep_group=rt.groups.ep_group)
        layer.load_full_state_dict(ref.state_dict())
        layers.append(layer)
    xs = [torch.randn(6 + r, 16, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    acc = MoEStatsAccumulator()
    x = xs[rank]
    infos = []
    for layer in layers:
        x, info = layer(x)
        infos.append(info)
    acc.add(infos)
    stats, seconds = acc.reduce(rt)
    tags = moe_scalars(stats, seconds, rt.ep_size)
    comm = comm_scalars(layers, steps=1)
    with torch.no_grad():  # the single-device model on the concatenated batch
        x_all, ref_stats = torch.cat(xs), []
        for ref in full:
            x_all, info = ref(x_all)
            ref_stats.append(info.stats)
    teardown(rt)
    return {"tags": tags, "seconds": seconds, "ref": moe_scalars(ref_stats, None, world), "comm": comm}


def test_ep_window_gives_global_device_load_idle_time_and_timing_spread():
    from aoe_ep.parallel.spawn import run_distributed

    per_rank = run_distributed(2, _ep_window)
    ref = per_rank[0]["ref"]
    for r in per_rank:
        for tag in (
            "moe/idle_time",
            "moe/idle_time_device",
            "moe/layer01/device_load",
            "moe/layer00/device_max_minus_min",
            "moe/layer00/load",
        ):
            assert r["tags"][tag] == pytest.approx(ref[tag], abs=1e-12), tag
    # the max / min of each rank's seconds reach every rank, so both report the same spread
    assert torch.equal(per_rank[0]["seconds"], per_rank[1]["seconds"])
    assert (per_rank[0]["seconds"][..., 0] >= per_rank[0]["seconds"][..., 1]).all()
    for r in per_rank:
        assert r["comm"]["moe/bytes_per_step/dispatch/fwd"] > 0 and r["comm"]["moe/bytes_per_step/sizes/fwd"] == 2 * 16
