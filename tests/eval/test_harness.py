"""The lm-evaluation-harness model `aoe-ep`, offline, on three small tasks (tests/eval/tasks.py: a multiple-choice
task, a rolling-perplexity task, a generation task over local JSON files): every metric the harness reports equals
the one computed directly from the model's logits in this file."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval adapter needs `pip install -e .[eval]`")

from aoe_ep.config import load_config  # noqa: E402
from aoe_ep.data import build_tokenizer  # noqa: E402
from aoe_ep.eval.generate import SamplingConfig, generate  # noqa: E402
from aoe_ep.model import Decoder  # noqa: E402
from tests.eval.tasks import CHOICE_DOCS, GEN_DOCS, TASKS, TEXT_DOCS, offline_task_manager  # noqa: E402


def _model() -> Decoder:
    cfg = load_config(
        "tiny",
        [
            "model.n_layers=1",
            "model.d_model=32",
            "model.n_heads=2",
            "model.max_seq_len=48",
            "moe.d_ffn=32",
            "moe.d_low=8",
        ],
    )
    torch.manual_seed(0)
    return Decoder(cfg.model, cfg.moe).eval()


def _logprob(model, ids: list[int], start: int) -> float:
    """Σ log p(ids[t] | ids[:t]) for t >= start, one unbatched forward."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_harness_metrics_equal_a_direct_computation(tmp_path, monkeypatch):
    from aoe_ep.eval.harness import AoeEpLM

    task_manager = offline_task_manager(tmp_path, monkeypatch)
    model, tok = _model(), build_tokenizer("byte")
    lm = AoeEpLM(model=model, tokenizer=tok, batch_size=3)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=TASKS,
        task_manager=task_manager,
        num_fewshot=0,
        log_samples=False,
        bootstrap_iters=0,
    )
    results = out["results"]

    # multiple choice: the choice of highest log-likelihood (acc), or per byte of the choice (acc_norm)
    acc = acc_norm = 0
    for doc in CHOICE_DOCS:
        context = tok.encode(doc["question"])
        scores = [_logprob(model, context + tok.encode(c), len(context)) for c in doc["choices"]]
        acc += max(range(len(scores)), key=lambda i: scores[i]) == doc["label"]
        norm = [s / len(c.encode()) for s, c in zip(scores, doc["choices"])]
        acc_norm += max(range(len(norm)), key=lambda i: norm[i]) == doc["label"]
    assert results["aoe_tiny_choice"]["acc,none"] == pytest.approx(acc / len(CHOICE_DOCS))
    assert results["aoe_tiny_choice"]["acc_norm,none"] == pytest.approx(acc_norm / len(CHOICE_DOCS))

    # rolling: every token of each text predicted once, the first from the end-of-document id; windows of 48
    total, n_bytes, n_words = 0.0, 0, 0
    for doc in TEXT_DOCS:
        ids = tok.encode(doc["text"])
        for begin in range(0, len(ids), 48):  # disjoint windows, each conditioned on the 48 tokens before
            context = [tok.eod] + ids[:begin] if begin == 0 else ids[begin - 48 : begin]
            window = ids[begin : begin + 48]
            seq = (context + window)[-49:]
            total += _logprob(model, seq, len(seq) - len(window))
        n_bytes += len(doc["text"].encode())
        n_words += len(re.split(r"\s+", doc["text"]))  # the harness counts words this way
    assert results["aoe_tiny_text"]["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)
    assert results["aoe_tiny_text"]["word_perplexity,none"] == pytest.approx(math.exp(-total / n_words), rel=1e-5)

    # generation: greedy until a newline, at most 6 tokens
    matches = 0
    for doc in GEN_DOCS:
        text = tok.decode(
            generate(model, tok.encode(doc["prompt"]), SamplingConfig(max_new_tokens=6), stop_id=tok.eod)
        ).split("\n")[0]
        matches += text.strip() == doc["answer"]
    assert results["aoe_tiny_gen"]["exact_match,none"] == pytest.approx(matches / len(GEN_DOCS))


def test_the_model_is_registered_under_its_name():
    from lm_eval.api.registry import get_model

    import aoe_ep.eval.harness as harness

    assert get_model("aoe-ep") is harness.AoeEpLM
    assert get_model("hf").__name__ == "HFLM"  # lm_eval's own models stay registered beside it
