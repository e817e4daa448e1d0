"""`aoe-ep eval`: the loss and perplexity of a checkpoint.

Without data it evaluates the run's own validation split exactly as the trainer does (the same datasets, batch
layout, precision and code: `aoe_ep.train.validation`), so the result equals the `valid/loss` the trainer logged at
the checkpoint's step. With data (megatron-core .bin/.idx prefixes, or .txt / .jsonl files tokenized with the
run's tokenizer, one document per file or line, each followed by the end-of-document id), every token of the
concatenated stream after the first is predicted once: the stream is cut into consecutive windows of
`data.seq_len` tokens, each window predicting its next tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from aoe_ep.data import build_tokenizer
from aoe_ep.data.errors import DataError
from aoe_ep.data.indexed import check_tokenizer, inspect_dataset
from aoe_ep.data.preprocessing import SUFFIXES, read_documents
from aoe_ep.data.tokenizer import Tokenizer
from aoe_ep.eval.loading import LoadedCheckpoint, open_checkpoint
from aoe_ep.parallel.runtime import all_reduce_
from aoe_ep.train.batches import BatchPlan, plan_batches
from aoe_ep.train.validation import autocast_dtype, num_validation_batches, validation_sums


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    step: int
    checkpoint: str
    data: list[str]

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "step": self.step,
            "checkpoint": self.checkpoint,
            "data": self.data,
        }


def read_token_stream(spec: str, tokenizer: Tokenizer) -> np.ndarray:
    """The tokens of a dataset prefix (its .bin as written: documents with their eod) or of a text file."""
    path = Path(spec)
    if path.suffix in SUFFIXES and path.is_file():
        ids: list[int] = []
        for text, _ in read_documents(path):
            if text.strip():
                ids.extend(tokenizer.encode(text))
                ids.append(tokenizer.eod)
        if not ids:
            raise DataError(f"{spec}: holds no text")
        return np.asarray(ids, dtype=np.int64)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise DataError(f"{spec}: not a regular file (a device or pipe cannot be read as text)")
    if path.is_file() and path.suffix not in (".bin", ".idx"):
        raise DataError(f"{spec}: expected a .txt or .jsonl file or a dataset prefix (PREFIX.bin + PREFIX.idx)")
    info = inspect_dataset(str(path))
    check_tokenizer(info, tokenizer)
    return np.fromfile(str(path) + ".bin", dtype=info.dtype).astype(np.int64)


class StreamWindows:
    """Consecutive windows of a token stream: item i predicts stream[i·S + 1 : (i+1)·S + 1] from the S tokens
    before; the last window is padded with masked positions, as is every item past the end (so that all ranks run
    the same number of batches, which the expert-parallel layers need)."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        self.stream, self.seq_len = torch.from_numpy(stream), seq_len
        self.num_windows = math.ceil((len(stream) - 1) / seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> dict:
        s = self.seq_len
        tokens, labels, mask = torch.zeros(s, dtype=torch.long), torch.zeros(s, dtype=torch.long), torch.zeros(s)
        begin = index * s
        n = max(0, min(s, len(self.stream) - 1 - begin))
        tokens[:n] = self.stream[begin : begin + n]
        labels[:n] = self.stream[begin + 1 : begin + 1 + n]
        mask[:n] = 1.0
        return {"tokens": tokens, "labels": labels, "loss_mask": mask}


def validation_plan(cfg, world_size: int, rank: int, batch_size: Optional[int]) -> BatchPlan:
    """The trainer's layout of a global batch; on another number of ranks, where `train.micro_batch_size` does not
    divide it, the largest micro-batch that does (the loss is over the same samples, summed in another order)."""
    micro = batch_size or cfg.train.micro_batch_size
    samples = cfg.train.global_batch_tokens // cfg.data.seq_len
    if batch_size is None:
        while micro > 1 and samples % (micro * world_size):
            micro -= 1
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))
    return plan_batches(cfg, world_size, rank)


def _validation_split(loaded: LoadedCheckpoint, tokenizer: Tokenizer, batch_size: Optional[int]):
    """The run's validation dataset and batch layout, built as `Trainer` builds them."""
    from aoe_ep.data import build_datasets

    cfg, rt = loaded.cfg, loaded.runtime
    plan = validation_plan(cfg, rt.world_size, rt.rank, batch_size)
    _, valid = build_datasets(
        cfg.data,
        tokenizer,
        train_samples=0,
        valid_samples=cfg.train.eval_steps * plan.global_samples,
        seed=cfg.train.seed,
    )
    return valid, plan, num_validation_batches(valid, plan, cfg.train.eval_steps)


def _data_windows(loaded: LoadedCheckpoint, tokenizer: Tokenizer, data: Sequence[str], batch_size: int):
    cfg, rt = loaded.cfg, loaded.runtime
    stream = np.concatenate([read_token_stream(spec, tokenizer) for spec in data])
    if len(stream) < 2:
        raise DataError(f"{', '.join(data)}: fewer than 2 tokens, nothing to predict")
    windows = StreamWindows(stream, cfg.data.seq_len)
    plan = BatchPlan(
        seq_len=cfg.data.seq_len,
        global_samples=batch_size * rt.world_size,
        micro_batch_size=batch_size,
        world_size=rt.world_size,
        rank=rt.rank,
    )
    return windows, plan, math.ceil(len(windows) / plan.global_samples)


def evaluate_checkpoint(
    checkpoint: str,
    data: Optional[Sequence[str]] = None,
    batch_size: Optional[int] = None,
    expert_parallel_size: Optional[int] = None,
    device: Optional[str] = None,
) -> EvalResult:
    """Loss, perplexity and predicted-token count of `checkpoint` (collective under torchrun)."""
    with open_checkpoint(checkpoint, expert_parallel_size, device) as loaded:
        cfg, rt = loaded.cfg, loaded.runtime
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        if data:
            dataset, plan, num_batches = _data_windows(
                loaded, tokenizer, data, batch_size or cfg.train.micro_batch_size
            )
        else:
            dataset, plan, num_batches = _validation_split(loaded, tokenizer, batch_size)
            if num_batches == 0:
                raise DataError(
                    f"{loaded.path}: the run's validation split is empty (data.split {cfg.data.split!r}); pass --data"
                )
        bar = tqdm(total=num_batches, disable=not rt.is_main, unit="batch", desc="eval", dynamic_ncols=True)
        sums = validation_sums(
            loaded.model,
            loaded.moe_layers,
            dataset,
            plan,
            num_batches,
            rt.device,
            autocast_dtype(cfg.train.precision, rt.device),
            progress=bar,
        )
        bar.close()
        all_reduce_(sums)
        loss = float(sums[0] / sums[1].clamp_min(1.0))
        return EvalResult(
            loss=loss,
            perplexity=math.exp(min(loss, 50.0)),
            tokens=int(sums[1]),
            step=loaded.step,
            checkpoint=str(loaded.path),
            data=list(data or []),
        )
