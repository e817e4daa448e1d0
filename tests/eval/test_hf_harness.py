"""lm-evaluation-harness's own `hf` model on an `aoe-ep export` directory scores what the `aoe-ep` model scores on
the checkpoint it came from, on the offline tasks of tests/eval/tasks.py: the same metrics, and per sample the same
log-likelihoods (relative 1e-6), the same greedy flags and the same generated texts. A routed MoE exports as a stock
Mixtral (no remote code), an AoE model as the `aoe_ep` architecture (trust_remote_code=True); both read bytes through
the exported tokenizer.json, with the harness's defaults otherwise (context length, prefix token, padding)."""

from __future__ import annotations

import math

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the harness tests need `pip install -e .[eval]`")

from aoe_ep.hf.export import export_checkpoint  # noqa: E402
from aoe_ep.hf.importer import write_run  # noqa: E402
from tests.eval.tasks import TASKS, offline_task_manager  # noqa: E402
from tests.hf.conftest import kind_config, random_model  # noqa: E402

BATCH_SIZE = 3  # several requests of unequal lengths per batch: padding and sorting matter
REL = 1e-6


def _evaluate(model: str, model_args: str, task_manager) -> dict:
    import aoe_ep.eval.harness  # noqa: F401  (registers the model `aoe-ep`)

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=task_manager,
        num_fewshot=0,
        batch_size=BATCH_SIZE,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )


def _responses(out: dict, task: str) -> list:
    """The model's answer to every request of `task`, in document order: (log-likelihood, is greedy) pairs,
    rolling log-likelihoods, or generated texts."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [resp for s in samples for resp in s["filtered_resps"]]


def _same_loglikelihood(a, b) -> bool:
    if isinstance(a, (tuple, list)):  # (log-likelihood, is greedy)
        return a[1] == b[1] and _same_loglikelihood(a[0], b[0])
    return b == pytest.approx(a, rel=REL, abs=0)


@pytest.mark.parametrize("kind, remote_code", [("mixtral", False), ("aoe_l2", True)])
def test_hf_model_on_the_export_scores_as_the_aoe_ep_model(kind, remote_code, tmp_path, monkeypatch):
    run, hf = tmp_path / "run", tmp_path / "hf"
    cfg = kind_config(kind, f"train.out_dir={run}")
    run.mkdir()
    write_run(cfg, random_model(cfg, seed=3).state_dict(), run, run)
    result = export_checkpoint(run, hf)
    assert result.format == ("aoe_ep" if remote_code else "mixtral") and "tokenizer.json" in result.files
    task_manager = offline_task_manager(tmp_path, monkeypatch)

    ours = _evaluate("aoe-ep", f"checkpoint={run}", task_manager)
    theirs = _evaluate("hf", f"pretrained={hf},dtype=float32,trust_remote_code={remote_code}", task_manager)

    for task in ("aoe_tiny_choice", "aoe_tiny_text"):
        a, b = _responses(ours, task), _responses(theirs, task)
        assert len(a) == len(b) > 0
        assert all(_same_loglikelihood(x, y) for x, y in zip(a, b)), (task, a, b)
    generated = _responses(ours, "aoe_tiny_gen")
    assert generated == _responses(theirs, "aoe_tiny_gen") and all(generated)

    a, b = ours["results"], theirs["results"]
    for metric in ("acc,none", "acc_norm,none"):
        assert a["aoe_tiny_choice"][metric] == b["aoe_tiny_choice"][metric]
    assert a["aoe_tiny_gen"]["exact_match,none"] == b["aoe_tiny_gen"]["exact_match,none"]
    assert b["aoe_tiny_text"]["bits_per_byte,none"] == pytest.approx(a["aoe_tiny_text"]["bits_per_byte,none"], rel=REL)
    # exp(mean negative log-likelihood per word): compared by its exponent, which float32 rounding shifts by ~1e-8
    # relative, while the exponential turns the same shift into ~1e-6 of a perplexity in the 1e15s (random weights)
    perplexity = [math.log(r["aoe_tiny_text"]["word_perplexity,none"]) for r in (a, b)]
    assert perplexity[1] == pytest.approx(perplexity[0], rel=REL)
