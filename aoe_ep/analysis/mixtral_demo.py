"""A small Mixtral-format checkpoint for the router-free study, made locally: random, or briefly trained on the
built-in corpus (the first files of the standard library sources, byte tokenizer) with transformers' own
`MixtralForCausalLM` and its load-balancing loss.

    python -m aoe_ep.analysis.mixtral_demo runs/mixtral_demo --steps 300
    aoe-ep router-free runs/mixtral_demo --node all --tokenizer byte
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from tqdm import tqdm

from aoe_ep.data import build_tokenizer


def small_mixtral_config(
    vocab_size: int = 257,
    hidden: int = 64,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    ffn: int = 128,
    max_len: int = 256,
):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max_len,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
    )


def corpus_tokens(cache_dir: str, max_bytes: int) -> torch.Tensor:
    """The first `max_bytes` of the built-in corpus, byte-tokenized (documents followed by eod)."""
    from aoe_ep.data.default_corpus import default_corpus_prefix
    from aoe_ep.eval.perplexity import read_token_stream

    tokenizer = build_tokenizer("byte")
    return torch.from_numpy(read_token_stream(default_corpus_prefix(cache_dir, tokenizer, max_bytes), tokenizer))


def make_small_mixtral(
    out_dir: str | Path,
    steps: int = 0,
    seed: int = 0,
    batch: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    cache_dir: str = ".cache/aoe_ep",
    corpus_bytes: int = 2_000_000,
    progress: bool = True,
    **config_kwargs,
) -> list[float]:
    """Write a small MixtralForCausalLM to `out_dir`, trained `steps` AdamW steps on random windows of the
    corpus (0: as initialised). Returns the training losses."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(small_mixtral_config(**config_kwargs))
    losses: list[float] = []
    if steps:
        tokens = corpus_tokens(cache_dir, corpus_bytes)
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        model.train()
        for _ in tqdm(range(steps), disable=not progress, desc="mixtral", unit="step"):
            starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen)
            ids_BS = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
            loss = model(input_ids=ids_BS, labels=ids_BS).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
    model.eval()
    model.save_pretrained(str(out_dir))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=".cache/aoe_ep")
    args = parser.parse_args()
    losses = make_small_mixtral(args.out_dir, steps=args.steps, seed=args.seed, cache_dir=args.cache_dir)
    if losses:
        print(f"{args.out_dir}: trained {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
