"""Generation with the KV cache: prefill + one token at a time computes what re-running the whole prefix computes
(logits and greedy tokens), for a chunked prefill too; top-p keeps the right nucleus; `aoe-ep generate` runs."""

from __future__ import annotations

import pytest
import torch

from aoe_ep.cli import main
from aoe_ep.config import load_config
from aoe_ep.eval.generate import SamplingConfig, generate, top_p_filter
from aoe_ep.model import Decoder


def _model(scorer: str) -> Decoder:
    cfg = load_config(
        "tiny",
        [
            "model.n_layers=2",
            "model.d_model=32",
            "model.n_heads=2",
            "model.max_seq_len=40",
            "moe.d_ffn=32",
            "moe.d_low=8",
            f"moe.scorer={scorer}",
        ],
    )
    torch.manual_seed(0)
    return Decoder(cfg.model, cfg.moe).eval()


@pytest.mark.parametrize("scorer", ["aoe", "router"])
def test_cached_decoding_equals_rerunning_the_prefix(scorer):
    model = _model(scorer)
    prompt = [5, 17, 200, 3, 99, 42]
    greedy = SamplingConfig(max_new_tokens=20)
    cached = generate(model, prompt, greedy)
    rerun = generate(model, prompt, greedy, use_cache=False)
    assert cached == rerun and len(cached) == 20

    # the logits of every step, not only their argmax; and a prefill in two chunks (a mask offset by the cache)
    ids = torch.tensor([prompt + cached])
    with torch.no_grad():
        full = model(ids).logits[0]
        cache = model.new_cache(1)
        first = model(ids[:, :4], cache).logits[0]
        second = model(ids[:, 4:10], cache).logits[0]
        steps = [model(ids[:, t : t + 1], cache).logits[0, 0] for t in range(10, ids.shape[1])]
    got = torch.cat([first, second, torch.stack(steps)])
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_stays_in_the_nucleus():
    model = _model("aoe")
    prompt = [1, 2, 3]
    nucleus = SamplingConfig(max_new_tokens=8, greedy=False, top_p=0.5, seed=7)
    a, b = generate(model, prompt, nucleus), generate(model, prompt, nucleus)
    assert a == b and len(a) == 8
    assert generate(model, prompt, nucleus, use_cache=False) == a

    logits = torch.tensor([2.0, 1.0, 0.0, 2.0, -1.0])
    probs = torch.softmax(logits, 0)
    kept = top_p_filter(logits, 0.5)  # the two tied 2.0s make 0.63 > 0.5: both kept, ids 0 and 3
    assert kept.nonzero().flatten().tolist() == [0, 3]
    torch.testing.assert_close(kept[[0, 3]], probs[[0, 3]] / probs[[0, 3]].sum())
    assert top_p_filter(logits, 0.2).nonzero().flatten().tolist() == [0]  # the tie goes to the lower id
    torch.testing.assert_close(top_p_filter(logits, 1.0), probs)


def test_generate_command(tiny_run, capsys):
    run, _ = tiny_run
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(out.rstrip("\n")) > len("def ")
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x" * 200]) == 2
    assert "aoe-ep generate: error: the prompt has 200 tokens" in capsys.readouterr().err
