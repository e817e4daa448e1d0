"""Training and validation datasets: megatron-core's `BlendedMegatronDatasetBuilder` over `GPTDataset`s.

`data.paths` are indexed-dataset prefixes (made by `aoe-ep preprocess` or megatron's own tools), blended by
`data.weights`; with no paths, the built-in default corpus. Documents are divided into train/valid/test by
`data.split` (megatron-core's rule: by document position), test documents are held out and never read.
Item i of a dataset is a function of (files, seed, seq_len, split, i) and of the number of epochs the requested
size spans: megatron shuffles documents and samples with `numpy.random.RandomState(seed)`, one shuffle over all
the epochs, and caches the indices under `data.cache_dir/megatron_indices`. So a trainer resumes by sample index
when it asks for the same size (or any size within the same number of epochs); asking for more epochs (raising
train.max_steps past an epoch boundary) re-draws the order, as in Megatron-LM.

Each item: `tokens` and `labels` (LongTensor [seq_len], labels[t] = tokens[t+1] in the token stream),
`loss_mask` (float [seq_len], ones: documents are packed, separated by eod), `position_ids`; blends add
`dataset_id`.
"""

from __future__ import annotations

import aoe_ep.megatron_core  # noqa: F401  (first: megatron-core without its TE / apex start-up warnings)

# isort: split
import copy
import logging
import math
import os
from typing import Optional

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from aoe_ep.config import DataConfig
from aoe_ep.data.cpp_helpers import ensure_megatron_helpers
from aoe_ep.data.default_corpus import default_corpus_prefix
from aoe_ep.data.errors import DataError
from aoe_ep.data.indexed import IndexInfo, check_tokenizer, inspect_dataset
from aoe_ep.data.tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")


def build_datasets(
    cfg: DataConfig, tokenizer: Tokenizer, train_samples: int, valid_samples: int, seed: int
) -> tuple[Optional[torch.utils.data.Dataset], Optional[torch.utils.data.Dataset]]:
    """(train, valid) datasets of at least `train_samples` / `valid_samples` items of `cfg.seq_len` tokens.

    A dataset is None when zero samples are asked of it, or `cfg.split` gives its part weight 0. Every rank calls
    this; when torch.distributed is initialised rank 0 writes the caches first while the others wait.
    """
    for name, value in (("train_samples", train_samples), ("valid_samples", valid_samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"build_datasets: {name} must be a non-negative integer, got {value!r}")
    prefixes, weights = _blend(cfg, tokenizer)
    infos = []
    for prefix in prefixes:
        info = inspect_dataset(prefix)
        check_tokenizer(info, tokenizer)
        infos.append(info)
    if len(prefixes) > 1 and weights is None:
        weights = [float(info.num_tokens) for info in infos]  # blend in proportion to size, as the sizes asked for
    ensure_megatron_helpers(cfg.cache_dir)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=cfg.seq_len,
        blend=(prefixes, weights),
        split=cfg.split,
        path_to_cache=os.path.join(os.path.abspath(cfg.cache_dir), "megatron_indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # Build only what is asked for: megatron would loop forever on a split part that holds no tokens.
    sizes = [train_samples, valid_samples, 0]
    config.split_matrix = [
        part if part is not None and sizes[i] > 0 else None for i, part in enumerate(config.split_matrix)
    ]
    _check_split(config.split_matrix, infos, cfg.split)

    builder = _Builder(GPTDataset, sizes, lambda: True, config)
    train, valid, _ = builder.build()
    return train, valid


def _blend(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[list[str], Optional[list[float]]]:
    """Absolute prefixes and normalised weights (None: one dataset); zero-weight paths are left out."""
    if not isinstance(cfg.paths, list) or not all(isinstance(p, str) and p for p in cfg.paths):
        raise DataError(f"data.paths: must be a list of dataset prefixes, got {cfg.paths!r}")
    if not cfg.paths:
        return [default_corpus_prefix(cfg.cache_dir, tokenizer, cfg.default_corpus_max_bytes)], None
    prefixes = [os.path.abspath(os.path.expanduser(p)) for p in cfg.paths]
    if not cfg.weights:
        return prefixes, None
    if len(cfg.weights) != len(prefixes):
        raise DataError(f"data.weights: {len(cfg.weights)} weights for {len(prefixes)} paths")
    for path, w in zip(cfg.paths, cfg.weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise DataError(f"data.weights: the weight of {path} must be a finite number >= 0, got {w!r}")
    kept = [(p, float(w)) for p, w in zip(prefixes, cfg.weights) if w > 0]
    if not kept:
        raise DataError(f"data.weights: all weights are 0 ({cfg.weights!r})")
    if len(kept) == 1:
        return [kept[0][0]], None
    total = sum(w for _, w in kept)
    return [p for p, _ in kept], [w / total for _, w in kept]


def _check_split(split_matrix: list, infos: list[IndexInfo], split: str) -> None:
    """Each part to be built gets documents and tokens from every dataset (megatron's rounding, exactly)."""
    for i, part in enumerate(split_matrix):
        if part is None:
            continue
        for info in infos:
            n = len(info.sequence_lengths)
            begin, end = int(round(part[0] * float(n))), int(round(part[1] * float(n)))
            if end <= begin or int(info.sequence_lengths[begin:end].sum()) == 0:
                raise DataError(
                    f"{info.prefix}: data.split {split!r} leaves the {SPLITS[i]} part no documents (it has {n} "
                    f"documents); give it more documents (e.g. `aoe-ep preprocess --txt-mode paragraph` for one "
                    f"big text file) or change data.split"
                )


class _Builder(BlendedMegatronDatasetBuilder):
    """megatron-core's builder, except for blends in a single process (see `_InMemoryBlendedDataset`)."""

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            cls = _InMemoryBlendedDataset
        return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)


class _InMemoryBlendedDataset(BlendedDataset):
    """megatron-core 0.16's BlendedDataset calls torch.distributed.get_rank() on a cache miss, which raises without
    a process group. Its blending indices take milliseconds to compute (C++), so without torch.distributed they are
    computed in memory instead of cached; the sample order is the same either way."""

    def __init__(self, datasets, weights, size, config) -> None:
        config = copy.copy(config)
        config.path_to_cache = None
        log = logging.getLogger("megatron.core.datasets.blended_dataset")
        level = log.level
        log.setLevel(logging.ERROR)  # silence its warning that indices without path_to_cache are not saved
        try:
            super().__init__(datasets, weights, size, config)
        finally:
            log.setLevel(level)
