"""`aoe-ep train` end to end on the built-in corpus, and the one-line errors a user meets instead of tracebacks:
an unknown config key, missing or corrupt data files, a tokenizer that does not match the data, a vocabulary too
small for the tokenizer, `--resume` with nothing to resume."""

from __future__ import annotations

import json

import pytest

from aoe_ep.cli import main
from tests.train.conftest import real_corpus_overrides


def _sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def test_train_tiny_on_the_builtin_corpus_then_resume(tmp_path, corpus_cache, capsys):
    base = real_corpus_overrides(tmp_path, corpus_cache) + [
        "train.warmup_steps=5",
        "train.eval_interval=15",
        "train.save_interval=15",
        "train.eval_steps=1",
        "train.global_batch_tokens=2048",
    ]
    assert main(["train", "--config", "tiny"] + _sets(*base, "train.max_steps=30")) == 0
    out, err = capsys.readouterr()
    assert "trained to step 30" in out and "validation loss" in out
    assert "train:" in err and "30/30" in err  # the progress bar (rank 0, on stderr)

    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    valid = {r["step"]: r["valid/loss"] for r in evals if "valid/loss" in r}
    assert sorted(valid) == [0, 15, 30]
    assert valid[30] < valid[0] - 1.5  # ln 257 = 5.55 at the start; byte statistics are learnt within 30 steps
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000030"

    assert main(["train", "--config", "tiny", "--resume"] + _sets(*base, "train.max_steps=33")) == 0
    out, _ = capsys.readouterr()
    assert "resumed from" in out and "trained to step 33" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000033"


def _hf_tokenizer(path) -> str:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "</s>": 1, "def": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def _byte_dataset(tmp_path) -> str:
    from aoe_ep.data import preprocess

    text = tmp_path / "docs.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    prefix = str(tmp_path / "docs")
    preprocess([str(text)], prefix, "byte")
    return prefix


def _corrupt_dataset(tmp_path) -> str:
    prefix = tmp_path / "broken"
    (tmp_path / "broken.bin").write_bytes(b"\x00" * 64)
    (tmp_path / "broken.idx").write_bytes(b"not an index file at all")
    return str(prefix)


@pytest.mark.parametrize(
    "case", ["unknown_key", "missing_data", "corrupt_data", "tokenizer_mismatch", "vocab_too_small", "resume_nothing"]
)
def test_errors_are_one_clear_line(tmp_path, corpus_cache, capsys, case):
    args = ["train", "--config", "tiny"] + _sets(*real_corpus_overrides(tmp_path, corpus_cache))
    if case == "unknown_key":
        args += _sets("train.lrr=0.1")
        expected, mention = "aoe-ep: config error: train.lrr: unknown key", "train.lrr"
    elif case == "missing_data":
        args += _sets(f"data.paths=[{tmp_path}/nowhere]")
        expected, mention = "aoe-ep: data error: ", f"{tmp_path}/nowhere"
    elif case == "corrupt_data":
        args += _sets(f"data.paths=[{_corrupt_dataset(tmp_path)}]")
        expected, mention = "aoe-ep: data error: ", f"{tmp_path}/broken"
    elif case == "tokenizer_mismatch":
        args += _sets(
            f"data.paths=[{_byte_dataset(tmp_path)}]", f"data.tokenizer={_hf_tokenizer(tmp_path / 'tokenizer.json')}"
        )
        expected, mention = "aoe-ep: data error: ", "tokenized with 'byte'"
    elif case == "vocab_too_small":
        args += _sets("model.vocab_size=200")
        expected, mention = "aoe-ep: config error: model.vocab_size: 200 is smaller", "257"
    else:
        args += ["--resume"]
        expected, mention = "aoe-ep: checkpoint error: --resume: no checkpoint under", "checkpoints"
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("aoe-ep:")]
    assert len(lines) == 1 and lines[0].startswith(expected) and mention in lines[0], err
    assert "Traceback" not in err
