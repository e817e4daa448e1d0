"""Data: tokenizers, `aoe-ep preprocess` (text to megatron-core .bin/.idx), the train/valid datasets (megatron-core
GPTDataset and blends) and the built-in default corpus.

    tok = build_tokenizer(cfg.data.tokenizer)                  # .vocab_size, .eod, .encode, .decode
    train_ds, valid_ds = build_datasets(cfg.data, tok, train_samples=N, valid_samples=M, seed=cfg.train.seed)
    train_ds[i]   # {"tokens": LongTensor[seq_len], "labels": LongTensor[seq_len], "loss_mask": ..., ...}

`build_datasets` and `preprocess` import megatron-core (seconds), so they load on first use.
"""

from aoe_ep.data.errors import DataError
from aoe_ep.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["DataError", "Tokenizer", "build_tokenizer", "build_datasets", "preprocess", "PreprocessResult"]


def __getattr__(name: str):
    if name == "build_datasets":
        from aoe_ep.data.datasets import build_datasets

        return build_datasets
    if name in ("preprocess", "PreprocessResult"):
        from aoe_ep.data import preprocessing

        return getattr(preprocessing, name)
    raise AttributeError(f"module 'aoe_ep.data' has no attribute {name!r}")
