"""A small in-memory stand-in for `aoe_ep.data` with the same two entry points, for trainer tests that need many
short runs: items are deterministic functions of (seed, index), as the real datasets' are.

Each sample is an arithmetic sequence modulo 60 with a random start and stride, so a model can learn it within a
few steps (the loss falls), and it depends on context (the stride must be read from earlier tokens).
"""

from __future__ import annotations

import torch

VOCAB = 60


class SyntheticTokenizer:
    def __init__(self, vocab_size: int = VOCAB + 1):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1


class SyntheticDataset:
    def __init__(self, seq_len: int, num_samples: int, seed: int, salt: int):
        self.seq_len, self.num_samples, self.seed, self.salt = seq_len, num_samples, seed, salt

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.salt * 7919 + index)
        start = int(torch.randint(0, VOCAB, (1,), generator=gen))
        stride = int(torch.randint(1, 4, (1,), generator=gen))
        seq = (start + stride * torch.arange(self.seq_len + 1)) % VOCAB
        return {"tokens": seq[:-1].clone(), "labels": seq[1:].clone(), "loss_mask": torch.ones(self.seq_len)}


def build_tokenizer(spec: str) -> SyntheticTokenizer:
    return SyntheticTokenizer()


def build_datasets(data_cfg, tokenizer, train_samples: int, valid_samples: int, seed: int):
    return (
        SyntheticDataset(data_cfg.seq_len, train_samples, seed, salt=0),
        SyntheticDataset(data_cfg.seq_len, valid_samples, seed, salt=1),
    )


BUILDERS = (build_tokenizer, build_datasets)


def small_config(tmp_path, *overrides: str, preset: str = "tiny"):
    """The tiny preset shrunk for tests (1 layer, d=32, 16-token sequences, 64-token steps in 2 micro-batches),
    writing under tmp_path; `overrides` go last."""
    from aoe_ep.config import load_config

    base = [
        "model.n_layers=1",
        "model.d_model=32",
        "model.n_heads=2",
        "model.vocab_size=64",
        "model.max_seq_len=32",
        "moe.d_ffn=32",
        "moe.d_low=8",
        "data.seq_len=16",
        "train.global_batch_tokens=64",
        "train.micro_batch_size=2",
        "train.max_steps=6",
        "train.warmup_steps=1",
        "train.lr=0.01",
        "train.min_lr=0.001",
        "train.eval_interval=3",
        "train.eval_steps=1",
        "train.save_interval=3",
        "train.log_interval=1",
        f"train.out_dir={tmp_path}/run",
        f"data.cache_dir={tmp_path}/cache",
    ]
    return load_config(preset, base + list(overrides))


def run_recording(cfg, read, name: str, resume=None) -> dict:
    """Train `cfg` on these data (resuming from `resume`) and record `read(trainer)` as loaded ("loaded") and after
    training (`name`), with the history, evals and final model state: for the per-layer balancing buffers."""
    from aoe_ep.train.trainer import Trainer

    with Trainer(cfg, resume=resume, data=BUILDERS) as trainer:
        loaded = read(trainer)
        result = trainer.fit()
        return {
            "loaded": loaded,
            name: read(trainer),
            "history": result.history,
            "evals": result.evals,
            "state": {k: v.detach().clone() for k, v in trainer.dp.model.state_dict().items()},
        }
