"""Tokenizers trained inside the tests (nothing is downloaded) and a helper that writes a small dataset."""

from __future__ import annotations

import io
import json

import pytest

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "sphinx of black quartz, judge my vow",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture(scope="session")
def hf_json(tmp_path_factory) -> str:
    """A byte-level BPE with 300 ids, `<|endoftext|>` = id 0, saved as a tokenizers JSON file."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 10, trainer)
    path = tmp_path_factory.mktemp("hf") / "bpe.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A sentencepiece BPE with byte fallback (any text round-trips), trained on TEXTS; eos `</s>` = id 2."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 10),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(model.getvalue())
    return str(path)


def write_jsonl(path, docs: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset(name, docs, tokenizer="byte") -> prefix of a dataset preprocessed from a .jsonl of `docs`."""
    from aoe_ep.data import preprocess

    def make(name: str, docs: list[str], tokenizer="byte") -> str:
        source = write_jsonl(tmp_path / "src" / f"{name}.jsonl", docs)
        return preprocess([source], tmp_path / "data" / name, tokenizer, progress=False).prefix

    return make
