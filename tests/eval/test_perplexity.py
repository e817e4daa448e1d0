"""`aoe-ep eval`: on the run's validation split it reproduces the trainer's logged validation loss exactly; on a
text file or a dataset prefix it equals a next-token cross-entropy computed directly from the model; under expert
parallelism (2 gloo ranks, EP 2) it gives the one-process value."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from aoe_ep.cli import main
from aoe_ep.data import build_tokenizer, preprocess
from aoe_ep.eval.loading import open_checkpoint
from aoe_ep.eval.perplexity import evaluate_checkpoint
from aoe_ep.parallel.spawn import run_distributed

TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


def _eval_json(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_equals_the_validation_loss_the_trainer_logged(tiny_run, capsys):
    run, logged = tiny_run
    assert sorted(logged) == [0, 2, 4]
    for step, path in ((2, run / "checkpoints" / "step_00000002"), (4, run)):  # a run directory: its newest
        got = _eval_json(capsys, "--checkpoint", str(path))
        assert got["loss"] == logged[step], step  # exactly: the same code, data and layout
        assert got["perplexity"] == pytest.approx(math.exp(logged[step]))
        assert got["tokens"] == 2 * 2048  # eval_steps x global batch, every token counted
        assert got["step"] == step
    assert logged[4] < logged[0]


def _direct_loss(run, windows: list[list[int]]) -> tuple[float, int]:
    """Σ next-token cross-entropy / count, window by window, from the model's logits."""
    with open_checkpoint(run) as loaded:
        total, count = 0.0, 0
        with torch.no_grad():
            for ids in windows:
                ids_1S = torch.tensor([ids])
                logits = loaded.model(ids_1S[:, :-1]).logits[0]
                total += float(F.cross_entropy(logits.double(), ids_1S[0, 1:], reduction="sum"))
                count += len(ids) - 1
    return total / count, count


def test_eval_on_a_text_file_and_a_prefix_equals_a_direct_computation(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    text = tmp_path / "snippet.txt"
    text.write_text(TEXT * 3)  # 3 x 82 bytes + eod: two windows of 128 predicted tokens, the second partial
    ids = build_tokenizer("byte").encode(TEXT * 3) + [256]
    seq = 128
    windows = [ids[i : i + seq + 1] for i in range(0, len(ids) - 1, seq)]
    want, count = _direct_loss(run, windows)

    got = _eval_json(capsys, "--checkpoint", str(run), "--data", str(text), "--batch-size", "1")
    assert got["tokens"] == count == len(ids) - 1
    assert got["loss"] == pytest.approx(want, rel=1e-5)

    prefix = tmp_path / "snippet"
    preprocess([str(text)], str(prefix), "byte")
    got_prefix = _eval_json(capsys, "--checkpoint", str(run), "--data", str(prefix))
    assert got_prefix["tokens"] == count and got_prefix["loss"] == pytest.approx(want, rel=1e-5)


def _ep_worker(rank: int, world: int, checkpoint: str, text: str) -> tuple:
    torch.set_num_threads(1)
    data = evaluate_checkpoint(checkpoint, [text], batch_size=1, expert_parallel_size=2)
    return data.loss, data.tokens


def test_eval_under_expert_parallelism_matches_one_process(tiny_run, tmp_path):
    run, _ = tiny_run
    text = tmp_path / "snippet.txt"
    text.write_text(TEXT * 5)  # 386 tokens = 4 windows over 2 ranks x batch 1: two global batches
    one = evaluate_checkpoint(str(run), [str(text)], batch_size=1)
    results = run_distributed(2, _ep_worker, str(run), str(text))
    assert results[0] == results[1]  # every rank reports the global value
    loss, tokens = results[0]
    assert tokens == one.tokens == len(TEXT * 5) and loss == pytest.approx(one.loss, rel=1e-5)


def test_a_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aoe-ep: checkpoint error: --checkpoint") and err.count("\n") == 1
