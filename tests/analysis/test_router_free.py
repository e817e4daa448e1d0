"""Router-free selection on small Mixtral checkpoints built here (random, and briefly trained on the built-in
corpus): each pause node's layer equals a per-token computation from Eq. 1 written in this file; `--node router`
gives transformers' own perplexity; the command prints every node."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="router-free selection needs transformers (.[eval])")

from aoe_ep.analysis.mixtral_demo import make_small_mixtral, small_mixtral_config  # noqa: E402
from aoe_ep.analysis.router_free import (  # noqa: E402
    LOW_RANK_NODE,
    NODES,
    RouterFreeMoE,
    evaluate_node,
    load_mixtral,
    windows,
)
from aoe_ep.cli import main  # noqa: E402


def _svd_factors(w_FD: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_down [d, R] = U_R Σ_R^½ and W_up [R, f] = Σ_R^½ V_Rᵀ of W_g = w_FDᵀ, from torch's SVD directly."""
    u, s, vt = torch.linalg.svd(w_FD.t().double(), full_matrices=False)
    return (u[:, :rank] * s[:rank].sqrt()).float(), (s[:rank].sqrt()[:, None] * vt[:rank]).float()


def _reference_moe(block, x_TD: torch.Tensor, node: str, norm: str, d_low=None) -> torch.Tensor:
    """Per token: every expert's activation at `node` from Eq. 1 (W_g as W_down W_up at rank `d_low`, if given),
    its norm, the top-K (ties: lower index), gates softmax over the chosen norms, y = Σ g_i E_i(x)."""
    w_gate, w_p = block.experts.gate_up_proj.chunk(2, dim=1)
    w_o, k = block.experts.down_proj, block.gate.top_k
    factors = [_svd_factors(w, d_low) for w in w_gate] if d_low else None
    out = []
    for x in x_TD:
        acts, outputs = [], []
        for e in range(w_gate.shape[0]):
            c = x @ factors[e][0] if factors else None
            g, p = (c @ factors[e][1] if factors else w_gate[e] @ x), w_p[e] @ x
            h = F.silu(g) * p
            y = w_o[e] @ h
            acts.append({"xWg": g, "xWp": p, "silu_xWg": F.silu(g), "silu_xWg_xWp": h, "output": y, "xWdown": c}[node])
            outputs.append(y)
        order = {"l2": 2, "l1": 1, "linf": float("inf")}[norm]
        scores = torch.stack([torch.linalg.vector_norm(a, ord=order) for a in acts])
        chosen = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k]
        gates = torch.softmax(scores[chosen], 0)
        out.append(sum(g * outputs[i] for g, i in zip(gates, chosen)))
    return torch.stack(out)


@pytest.mark.parametrize("norm", ["l2", "l1", "linf"])
@torch.no_grad()
def test_every_node_equals_the_per_token_reference(norm):
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(small_mixtral_config(hidden=16, layers=1, experts=4, ffn=24)).eval()
    block = model.model.layers[0].mlp
    x_BSD = torch.randn(2, 5, 16)
    for node in NODES:
        got = RouterFreeMoE(block, node, norm, "softmax")(x_BSD)
        want = _reference_moe(block, x_BSD.reshape(-1, 16), node, norm).reshape(2, 5, 16)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{node}, {norm}")


@torch.no_grad()
def test_low_rank_nodes_equal_the_per_token_reference():
    torch.manual_seed(1)
    model = transformers.MixtralForCausalLM(small_mixtral_config(hidden=16, layers=1, experts=4, ffn=24)).eval()
    block = model.model.layers[0].mlp
    x_BSD = torch.randn(2, 5, 16)
    for node in NODES + (LOW_RANK_NODE,):
        got = RouterFreeMoE(block, node, "l2", "softmax", d_low=6)(x_BSD)
        want = _reference_moe(block, x_BSD.reshape(-1, 16), node, "l2", d_low=6).reshape(2, 5, 16)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=node)
    # at full rank the factors multiply back to W_g: the same layer as without d_low
    torch.testing.assert_close(
        RouterFreeMoE(block, "xWg", "l2", "softmax", d_low=16)(x_BSD),
        RouterFreeMoE(block, "xWg", "l2", "softmax")(x_BSD),
        rtol=1e-4,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="xWdown needs d_low"):
        RouterFreeMoE(block, LOW_RANK_NODE, "l2", "softmax")
    with pytest.raises(ValueError, match="--d-low 17: must lie in"):
        RouterFreeMoE(block, "xWg", "l2", "softmax", d_low=17)


def _hf_perplexity(model, ids: list[int], seq_len: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows(ids, seq_len):
            ids_1S = torch.tensor([window])
            loss = model(input_ids=ids_1S, labels=ids_1S, output_router_logits=False).loss
            total += float(loss) * (len(window) - 1)
            count += len(window) - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def mixtral_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    torch.set_num_threads(1)
    make_small_mixtral(root / "random", steps=0, progress=False, layers=2, experts=4, hidden=32, ffn=64)
    losses = make_small_mixtral(
        root / "trained",
        steps=40,
        batch=8,
        seq_len=64,
        cache_dir=str(root / "cache"),
        corpus_bytes=1_000_000,
        progress=False,
        layers=2,
        experts=4,
        hidden=32,
        ffn=64,
    )
    assert losses[-1] < losses[0] - 1.0
    return root / "random", root / "trained"


def test_router_node_is_transformers_own_perplexity(mixtral_dirs, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("import os\n\ndef main(argv):\n    return len(argv) + 1\n" * 6)
    ids = list(text.read_bytes())
    for hf_dir in mixtral_dirs:
        model = load_mixtral(hf_dir)
        want = _hf_perplexity(model, ids, 64)
        got = evaluate_node(model, ids, "router", seq_len=64)
        assert got.perplexity == pytest.approx(want, rel=1e-5)
        assert got.tokens == len(ids) - 1 and got.router_overlap == 1.0


def test_router_free_command_reports_every_node(mixtral_dirs, tmp_path, capsys):
    _, trained = mixtral_dirs
    text = tmp_path / "text.txt"
    text.write_text("class Stack:\n    def push(self, item):\n        self.items.append(item)\n" * 4)
    args = ["router-free", str(trained), "--node", "all", "--tokenizer", "byte", "--text", str(text), "--seq-len", "64"]
    assert main(args + ["--json"]) == 0
    rows = {r["node"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == list(NODES) + ["router"]
    for row in rows.values():
        assert math.isfinite(row["perplexity"]) and row["tokens"] == len(text.read_bytes()) - 1
        assert 0.0 <= row["router_overlap"] <= 1.0 and row["seconds"] > 0
        assert all(sum(layer) == pytest.approx(1.0) for layer in row["load"])
    assert rows["router"]["router_overlap"] == 1.0
    assert main(args[:3] + ["xWg"] + args[4:]) == 0
    assert "xWg" in capsys.readouterr().out
    assert main(["router-free", str(tmp_path), "--node", "xWg", "--tokenizer", "byte"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert main(args[:3] + ["xWdown"] + args[4:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--d-low" in err[0]
    assert main(args + ["--d-low", "65", "--json"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not transformers' loading bar
    assert len(err) == 1 and "--d-low 65: must lie in" in err[0]
    assert main(args + ["--d-low", "8", "--json"]) == 0
    low = {r["node"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(low) == list(NODES) + ["router", LOW_RANK_NODE]
    assert low["xWdown"]["d_low"] == 8 and low["router"]["d_low"] is None and rows["xWg"]["d_low"] is None
    assert low["router"]["perplexity"] == rows["router"]["perplexity"]
    assert low["xWg"]["perplexity"] != rows["xWg"]["perplexity"]
