"""The score margin against a direct computation: per token the K-th minus the (K+1)-th highest score under top-K
(ties included), the last kept minus the first dropped expert under top-P, and no margin where a token selected
every expert or none."""

import pytest
import torch

from aoe_ep.config import MoEConfig
from aoe_ep.moe import MoELayer
from aoe_ep.moe.selection import top_k_mask, top_p_mask
from aoe_ep.moe.stats import BatchSums, selection_margin


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_margin_is_kth_minus_next_score_with_ties(k):
    gen = torch.Generator().manual_seed(k)
    s_TE = torch.randint(0, 4, (64, 6), generator=gen).float()  # 4 values over 6 experts: ties on most rows
    margin_T = selection_margin(s_TE, top_k_mask(s_TE, k))
    for t in range(s_TE.shape[0]):
        ranked = sorted(s_TE[t].tolist(), reverse=True)
        assert margin_T[t].item() == ranked[k - 1] - ranked[k]
    assert (margin_T == 0).sum() > 0 and (margin_T > 0).sum() > 0  # the data holds both ties and clear winners


def test_top_p_margin_and_tokens_without_one():
    s_TE = torch.tensor([[3.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.9, 1.8, -1.0]])
    mask_TE = top_p_mask(torch.softmax(s_TE, dim=1), 0.6)
    assert mask_TE.sum(dim=1).tolist() == [1, 3, 2]
    margin_T = selection_margin(s_TE, mask_TE)
    assert margin_T.tolist() == pytest.approx([3.0 - 1.0, 0.0, 1.9 - 1.8])
    every, none = torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool)
    assert torch.isnan(selection_margin(s_TE[:1], every)).all() and torch.isnan(selection_margin(s_TE[:1], none)).all()
    sums = BatchSums.of(
        mask_TE,
        torch.softmax(s_TE, 1),
        torch.zeros(3),
        s_TE,
        torch.cat([margin_T[:2], margin_T.new_tensor([float("nan")])]),
    )
    stats = sums.stats()
    assert int(stats.margin_tokens) == 2 and float(stats.score_margin) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "selection,k,has_margin", [("top_k", 2, True), ("top_k", 4, False), ("expert_choice", 2, False)]
)
def test_layer_records_the_margin_of_its_decision_scores(selection, k, has_margin):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, num_experts=4, top_k=k, scorer="router", d_ffn=8, selection=selection)
    layer = MoELayer(cfg)
    x = torch.randn(10, 8)
    _, info = layer(x)
    assert int(info.stats.margin_tokens) == (10 if has_margin else 0)
    if has_margin:
        ranked = (x @ layer.scorer.weight.detach().t()).sort(dim=1, descending=True).values
        assert float(info.stats.score_margin) == pytest.approx(float((ranked[:, 1] - ranked[:, 2]).mean()), rel=1e-5)
    else:
        assert float(info.stats.score_margin) == 0.0
