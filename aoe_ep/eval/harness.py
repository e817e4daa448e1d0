"""The lm-evaluation-harness model `aoe-ep` (`pip install -e .[eval]`):

    aoe-ep lm-eval --model aoe-ep --model_args checkpoint=runs/tiny --tasks arc_easy piqa --batch_size 8
    # or from Python, after `import aoe_ep.eval.harness`:
    lm_eval.simple_evaluate(model="aoe-ep", model_args="checkpoint=runs/tiny", tasks=[...])

The harness's own `lm_eval` command does not import outside packages, so `aoe-ep lm-eval` registers the model and
hands its arguments to it. Requests are scored in batches of `batch_size` sequences (longest first, padded on the
right: a causal model's scored positions never see the padding, and top-K / top-P / AoE selection is per token);
generation runs one request at a time with the KV cache. Contexts longer than the model's `max_seq_len` keep their
last tokens, as the harness's other models do.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import lm_eval.models  # noqa: F401  (the harness's own models, registered lazily: see below)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from aoe_ep.data.tokenizer import Tokenizer
from aoe_ep.eval.generate import SamplingConfig, generate
from aoe_ep.model import Decoder


# lm_eval registers its own models (`hf`, `vllm`, ...) only when it finds its model registry empty; `lm_eval.models`,
# imported above, registers them first, so that `--model hf` still works once `aoe-ep` is registered.
@register_model("aoe-ep")
class AoeEpLM(TemplateLM):
    """`checkpoint`: a checkpoint or run directory; or, from Python, `model` and `tokenizer` objects."""

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        batch_size: int | str = 8,
        device: Optional[str] = None,
        max_length: Optional[int] = None,
        model: Optional[Decoder] = None,
        tokenizer: Optional[Tokenizer] = None,
        **unused,
    ) -> None:
        super().__init__()
        self._stack = contextlib.ExitStack()
        if checkpoint is not None:
            from aoe_ep.data import build_tokenizer
            from aoe_ep.eval.loading import open_checkpoint

            loaded = self._stack.enter_context(open_checkpoint(checkpoint, expert_parallel_size=1, device=device))
            model, tokenizer = loaded.model, build_tokenizer(loaded.cfg.data.tokenizer)
        if model is None or tokenizer is None:
            raise ValueError("aoe-ep: give model_args checkpoint=PATH (or, from Python, model= and tokenizer=)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or model.cfg.max_seq_len)
        self._device = model.head.weight.device

    def close(self) -> None:
        self._stack.close()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], progress: bool = False) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), whether every continuation token is the argmax) of each
        (context ids, continuation ids) pair, in batches."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, disable=not progress, desc="aoe-ep loglikelihood"):
            inputs, spans = [], []
            for i in batch:
                context, continuation = pairs[i]
                whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
                inputs.append(whole[:-1])
                spans.append((len(whole) - 1 - len(continuation), whole[len(whole) - len(continuation) :]))
            width = max(map(len, inputs))
            tokens_BS = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
            for row, ids in enumerate(inputs):
                tokens_BS[row, : len(ids)] = torch.tensor(ids)
            logp_BSV = F.log_softmax(self.model(tokens_BS.to(self._device)).logits.float(), dim=-1).cpu()
            for row, (i, (start, target)) in enumerate(zip(batch, spans)):
                logp_CV = logp_BSV[row, start : start + len(target)]
                target_C = torch.tensor(target)
                total = float(logp_CV.gather(1, target_C[:, None]).sum())
                results[i] = (total, bool((logp_CV.argmax(-1) == target_C).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.score(
            [(context, continuation) for _, context, continuation in requests], progress=not disable_tqdm
        )
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of every token of each string, in disjoint windows of max_length (the first conditioned on the
        end-of-document id), all windows of all strings scored in batches."""
        owners, pairs = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(
                self.tok_encode(string), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1
            )
            for window in map(make_disjoint_window, windows):
                owners.append(index)
                pairs.append(window)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self.score(pairs, progress=not disable_tqdm)):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its `until` strings (cut off) or `max_gen_toks` tokens; greedy
        unless `do_sample`, then top-p (`top_p`, `temperature`)."""
        outputs = []
        for req in tqdm(requests, disable=disable_tqdm, desc="aoe-ep generate_until"):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            sampling = SamplingConfig(
                max_new_tokens=max_new,
                greedy=not kwargs.get("do_sample", False),
                temperature=float(kwargs.get("temperature") or 1.0),
                top_p=float(kwargs.get("top_p") or 1.0),
                seed=int(kwargs.get("seed", 0)),
            )
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new) :] or [self.eot_token_id]

            def reached(new_ids: list[int]) -> bool:
                text = self.tokenizer.decode(new_ids)
                return any(stop in text for stop in until)  # noqa: B023 (used within this iteration)

            text = self.tokenizer.decode(
                generate(
                    self.model, prompt, sampling, stop_id=self.eot_token_id, should_stop=reached if until else None
                )
            )
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            outputs.append(text)
        return outputs


def main(argv: list[str]) -> None:
    """`lm_eval`'s command line with the `aoe-ep` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
