"""`aoe-ep generate`: continue a prompt, greedily or by top-p (nucleus) sampling, with a KV cache.

The prompt is run through the model once (prefill), then each new token once. Selection per token (top-K, top-P,
AoE norms) does not depend on the other tokens of the batch, so a cached step computes what a full re-run of the
prefix computes; expert choice does not have that property (an expert's capacity is shared by the batch), so its
models generate differently with and without the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from aoe_ep.model import Decoder


@dataclass(frozen=True)
class SamplingConfig:
    """greedy: argmax; otherwise softmax(logits / temperature) restricted to the smallest set of top tokens whose
    mass reaches top_p (1.0: all), renormalised. Generation stops after max_new_tokens or at `stop_id`."""

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def top_p_filter(logits_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities of the nucleus: tokens ranked by probability are kept while the mass ranked before them is
    below top_p (so at least one), then renormalised; ties keep the lower token id first."""
    probs_V = torch.softmax(logits_V.float(), dim=-1)
    order_V = torch.sort(probs_V, descending=True, stable=True).indices
    sorted_V = probs_V[order_V]
    keep_V = (torch.cumsum(sorted_V, 0) - sorted_V) < top_p
    kept_V = torch.zeros_like(probs_V)
    kept_V[order_V[keep_V]] = sorted_V[keep_V]
    return kept_V / kept_V.sum()


def next_token(logits_V: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> int:
    if sampling.greedy:
        return int(torch.argmax(logits_V))
    probs_V = top_p_filter(logits_V / sampling.temperature, sampling.top_p)
    return int(torch.multinomial(probs_V.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(
    model: Decoder,
    prompt: Sequence[int],
    sampling: SamplingConfig,
    stop_id: Optional[int] = None,
    use_cache: bool = True,
    should_stop: Optional[Callable[[list[int]], bool]] = None,
) -> list[int]:
    """The new token ids after `prompt` (stop_id, when reached, ends them and is not included; `should_stop` of
    the new ids so far ends them after a token, e.g. at a stop string). `use_cache=False` re-runs the whole
    sequence for every token (the reference the cache is tested against)."""
    sampling.validate()
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    room = model.cfg.max_seq_len - len(prompt)
    if room < 1:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens; model.max_seq_len={model.cfg.max_seq_len} leaves "
            f"no room for new ones"
        )
    model.eval()
    device = model.head.weight.device
    generator = torch.Generator().manual_seed(sampling.seed)
    ids = list(prompt)
    cache = model.new_cache(1) if use_cache else None
    step_input = torch.tensor([ids], device=device)
    new: list[int] = []
    for _ in range(min(sampling.max_new_tokens, room)):
        logits_V = model(step_input if use_cache else torch.tensor([ids], device=device), cache).logits[0, -1]
        token = next_token(logits_V, sampling, generator)
        if token == stop_id:
            break
        new.append(token)
        ids.append(token)
        if should_stop is not None and should_stop(new):
            break
        step_input = torch.tensor([[token]], device=device)
    return new
