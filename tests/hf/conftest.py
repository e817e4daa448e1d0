"""Tiny models of every exportable kind, with random weights (norm gains and biases included, so that every tensor
matters), for the Hugging Face export and import tests."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.config import load_config
from aoe_ep.model import Decoder
from tests.data.conftest import hf_json, sp_model  # noqa: F401  (tokenizers trained in the tests)

BASE = [
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=4",
    "model.vocab_size=257",
    "model.max_seq_len=48",
    "model.rope_theta=500.0",
    "model.norm_eps=1e-6",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.d_ffn=24",
    "moe.d_low=6",
]
ROUTER = ["moe.scorer=router", "moe.expert_kind=swiglu"]

# name: (overrides, the format `auto` exports it as)
KINDS = {
    "dense": (["model.ffn=dense", "model.d_ffn=40"], "llama"),
    "mixtral": (ROUTER, "mixtral"),
    "aoe_l2": ([], "aoe_ep"),
    "aoe_linf_top_p": (["moe.norm=linf", "moe.selection=top_p", "moe.top_p=0.5"], "aoe_ep"),
    "aoe_l1_softmax_all": (["moe.norm=l1", "moe.gate=softmax_all"], "aoe_ep"),
    "self_routing": (["moe.scorer=self_routing", "moe.expert_kind=swiglu"], "aoe_ep"),
    "router_factorized": (["moe.scorer=router", "moe.expert_kind=factorized"], "aoe_ep"),
    "router_hidden": (ROUTER + ["moe.router_hidden=24"], "aoe_ep"),
    "expert_choice": (ROUTER + ["moe.selection=expert_choice", "moe.capacity_factor=1.5"], "aoe_ep"),
    "threshold": (ROUTER + ["moe.selection=threshold", "moe.threshold=0.05"], "aoe_ep"),
    "balance_bias": (ROUTER + ["moe.balance=bias"], "aoe_ep"),
}


def kind_config(name: str, *extra: str):
    return load_config("tiny", BASE + KINDS[name][0] + list(extra))


def random_model(cfg, seed: int = 0) -> Decoder:
    """The decoder of `cfg` with random norm gains, expert biases and threshold biases."""
    torch.manual_seed(seed)
    model = Decoder(cfg.model, cfg.moe).eval()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight"):
                tensor.add_(0.2 * torch.randn_like(tensor))
            elif name.endswith("expert_bias"):
                tensor.copy_(0.5 * torch.randn_like(tensor))
            elif name.endswith("threshold_bias"):
                tensor.copy_(0.3 * torch.rand_like(tensor))
    return model


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield
