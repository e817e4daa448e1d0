"""The EP report: per-device load, idle time and timing spreads from real gloo ranks."""

import torch

from aoe_ep.parallel.spawn import run_distributed


def _two_layers(rank: int, world: int) -> dict:
    from aoe_ep.config import MoEConfig
    from aoe_ep.moe import MoELayer
    from aoe_ep.parallel.groups import destroy_groups, initialize_groups
    from aoe_ep.parallel.instrumentation import ep_report

    groups = initialize_groups(world)
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, num_experts=4, top_k=2, d_ffn=8, d_low=4, dispatcher="alltoall")
    layers = [MoELayer(cfg, ep_group=groups.ep_group) for _ in range(2)]
    x = torch.randn(6 + rank, 16, generator=torch.Generator().manual_seed(rank))
    infos = []
    for layer in layers:
        x, info = layer(x)
        infos.append(info)
    x.sum().backward()
    report = ep_report(infos, world, groups.ep_group, layers[0].dispatcher.counter.as_dict())
    destroy_groups()
    return {"report": report, "stats": [i.stats for i in infos], "scalars": report.scalars()}


def test_report_per_device_load_idle_time_and_spreads():
    per_rank = run_distributed(2, _two_layers)
    r0, r1 = per_rank[0]["report"], per_rank[1]["report"]
    assert torch.equal(r0.tokens_per_expert, r1.tokens_per_expert)  # global statistics, the same on every rank
    stats = per_rank[0]["stats"]
    # 13 tokens x top-2 per layer, split over the two devices' experts
    assert r0.tokens_per_device.sum(dim=1).tolist() == [26, 26]
    assert torch.equal(r0.tokens_per_device, r0.tokens_per_expert.view(2, 2, 2).sum(dim=2))
    expected_expert = sum(float(s.load.max() - s.load.min()) for s in stats)
    device_load = r0.tokens_per_device.double() / 26
    expected_device = float((device_load.max(dim=1).values - device_load.min(dim=1).values).sum())
    assert abs(r0.idle_time_expert - expected_expert) < 1e-12
    assert abs(r0.idle_time_device - expected_device) < 1e-12
    # timings of both ranks reach every rank, so the spreads agree
    assert r0.expert_seconds.shape == (2, 2) and torch.equal(r0.expert_seconds, r1.expert_seconds)
    assert (r0.combine_seconds >= 0).all()
    scalars = per_rank[0]["scalars"]
    assert scalars["moe/idle_time_device"] == r0.idle_time_device
    assert scalars["moe/bytes/dispatch/fwd"] > 0 and scalars["moe/bytes/dispatch/bwd"] > 0
