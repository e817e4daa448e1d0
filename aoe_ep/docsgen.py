"""The generated reference pages: docs/config.md (every config key) and docs/metrics.md (every logged key, and the
figures and summary of `aoe-ep report`).

`python -m aoe_ep.docsgen` rewrites both pages; `python -m aoe_ep.docsgen --check` exits 1 when either differs from
what the code would write (the test suite runs the check). A config field without a meaning here, or a meaning for a
field that no longer exists, is an error: the page cannot go stale silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path

from aoe_ep import config as C

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"

# The allowed values of the fields that take one of a fixed set, from the tuples the validation uses.
CHOICES = {
    "moe.scorer": C.SCORERS,
    "moe.norm": C.NORMS,
    "moe.selection": C.SELECTIONS,
    "moe.gate": C.GATES,
    "moe.dispatcher": C.DISPATCHERS,
    "moe.expert_kind": C.EXPERT_KINDS,
    "moe.expert_kernel": C.EXPERT_KERNELS,
    "moe.aoe_cache": C.AOE_CACHES,
    "moe.balance": C.BALANCES,
    "model.ffn": C.FFNS,
    "parallel.expert_placement": C.EXPERT_PLACEMENTS,
    "train.lr_decay_style": C.LR_DECAY_STYLES,
    "train.precision": C.PRECISIONS,
    "train.activation_checkpointing": C.AC_MODES,
    "train.dense_parallel": C.DENSE_PARALLEL,
    "train.device": ("auto", "cpu", "cuda"),
}

SECTIONS = {
    "model": "The decoder: a Llama-style stack of pre-RMSNorm blocks (RoPE attention, then a dense or MoE FFN).",
    "moe": "The MoE layer of every block when `model.ffn: moe` (docs/design.md section 1).",
    "parallel": "How the world of ranks is split: DP × EP, EP inner (docs/design.md section 2).",
    "data": "Training data: indexed datasets from `aoe-ep preprocess`, or the built-in corpus when `paths` is empty.",
    "train": "The optimiser, schedule, evaluation, checkpoints and the run's device and precision.",
}

CONFIG_HELP = {
    "model.n_layers": "decoder blocks",
    "model.d_model": "model (residual stream) width; `moe.d_model` follows it",
    "model.n_heads": "attention heads (d_model must divide by it)",
    "model.vocab_size": "embedding and output-head rows; at least the tokenizer's vocabulary",
    "model.max_seq_len": "longest sequence the RoPE tables cover (at least `data.seq_len`)",
    "model.ffn": "`dense`: a SwiGLU FFN of width `model.d_ffn` in every block; `moe`: the `moe:` section's layer",
    "model.d_ffn": "hidden width of the dense SwiGLU FFN (`model.ffn: dense`)",
    "model.rope_theta": "RoPE base frequency",
    "model.norm_eps": "RMSNorm epsilon",
    "moe.d_model": "input width of the layer; taken from `model.d_model` when the YAML leaves it out",
    "moe.num_experts": "experts n (divisible by `parallel.expert_parallel_size`)",
    "moe.top_k": "experts per token K under `top_k` selection (also the cost models' K)",
    "moe.scorer": "what ranks the experts: AoE norms of the low-rank cache, a learned router, or Self-Routing's "
    "hidden-state slice",
    "moe.d_ffn": "hidden width of a SwiGLU expert; AoE's `d_wide` is derived from it by Eq. 5",
    "moe.d_low": "AoE rank: width of the cache C = x·Wdown (factorised experts)",
    "moe.d_wide": "hidden width of a factorised (AoE) expert; derived by Eq. 5 when left out",
    "moe.norm": "AoE's norm of the cache (App. A)",
    "moe.selection": "selection strategy (docs/design.md section 1.3)",
    "moe.gate": "gate weights over the selected experts: softmax over them, or the full softmax unrenormalised",
    "moe.top_p": "probability mass P of `top_p` selection, in (0, 1]",
    "moe.capacity_factor": "expert choice: each expert takes ⌈T·capacity_factor/n⌉ tokens",
    "moe.aux_loss_coeff": "weight α of the load-balancing loss (`moe.balance: aux`)",
    "moe.top_p_entropy_coeff": "weight of top-P's confidence-entropy regulariser",
    "moe.self_routing_offset": "Self-Routing: first channel of the n-channel slice read as logits",
    "moe.dispatcher": "expert-parallel dispatcher (docs/design.md section 2.2); unused at EP 1",
    "moe.expert_kind": "`swiglu` or `factorized` experts; `auto`: factorised for AoE, SwiGLU otherwise",
    "moe.router_hidden": "router scorer only: a hidden layer of this width (the AoE paper's large router); 0: none",
    "moe.expert_kernel": "expert matmuls: one grouped product per projection, or one product per expert; `auto` "
    "chooses by device, dtype and rows per expert",
    "moe.aoe_cache": "AoE: keep the [T, n, d_low] cache for backward, or recompute it there (less memory)",
    "moe.balance": "`aux`: the load-balancing loss; `bias`: a per-expert selection bias moved after each step; "
    "`none`: neither",
    "moe.balance_rate": "`balance: bias`: how far a bias moves per step",
    "moe.erc_loss_coeff": "weight of the expert-router coupling loss (router scorer; 0: off)",
    "moe.erc_alpha": "α of the ERC loss",
    "moe.threshold": "threshold selection: expert i fires when relu(s_i − b_i) exceeds this",
    "moe.threshold_density": "threshold selection: target share ρ* of (token, expert) pairs fired",
    "moe.threshold_mu": "threshold selection: μ, the share of the expert-balance term in its balancing loss",
    "moe.threshold_eta": "threshold selection: η, the rate at which λ moves towards the target density",
    "moe.threshold_lambda_init": "threshold selection: initial weight λ of its balancing loss (at most 1)",
    "parallel.expert_parallel_size": "EP: ranks the experts of a layer are sharded over (the world divides by it)",
    "parallel.expert_placement": "which experts each EP rank holds: the contiguous split, or one balanced from "
    "the load recorded at the last checkpoint",
    "parallel.placement_half_life": "steps over which a step's counts lose half their weight in the recorded load "
    "(0: all steps alike)",
    "data.paths": "dataset prefixes (.bin/.idx); empty: the built-in corpus",
    "data.weights": "blend weights of `paths` (empty: in proportion to their token counts)",
    "data.split": "train,valid,test weights over each dataset's documents",
    "data.tokenizer": "`byte`, a Hugging Face tokenizers .json file, or a sentencepiece .model",
    "data.seq_len": "tokens per training sample",
    "data.cache_dir": "the built-in corpus, the datasets' sample indices and compiled helpers (shared by all ranks)",
    "data.default_corpus_max_bytes": "size cap of the built-in corpus",
    "train.max_steps": "optimiser steps of the run",
    "train.global_batch_tokens": "tokens per optimiser step over all ranks",
    "train.micro_batch_size": "sequences per rank per forward (the rest is gradient accumulation)",
    "train.lr": "peak learning rate",
    "train.min_lr": "learning rate at the end of the decay",
    "train.warmup_steps": "steps of linear warm-up",
    "train.weight_decay": "AdamW weight decay on matrices (norm weights have none)",
    "train.beta1": "AdamW β1",
    "train.beta2": "AdamW β2",
    "train.grad_clip": "global gradient-norm clipping threshold",
    "train.eval_interval": "steps between validations",
    "train.eval_steps": "global batches of validation data per validation",
    "train.save_interval": "steps between checkpoints (the last step is always saved)",
    "train.log_interval": "steps between logged records",
    "train.out_dir": "the run directory: logs, tensorboard, checkpoints (one run at a time)",
    "train.seed": "seed of the initialisation, the data order and every noise stream",
    "train.lr_decay_style": "shape of the decay after warm-up",
    "train.lr_decay_steps": "steps of warm-up plus decay (null: max_steps)",
    "train.eval_at_start": "validate before the first step",
    "train.exit_at_step": "stop (with a checkpoint) at this step without changing the schedule (0: max_steps)",
    "train.keep_checkpoints": "keep only the newest K checkpoints (0: all)",
    "train.precision": "`auto`: bf16 autocast with fp32 master weights on GPU, fp32 on CPU",
    "train.dense_parallel": "the non-expert weights: replicated (DDP) or sharded over the world (FSDP2)",
    "train.device": "`auto`: CUDA when available",
    "train.peak_tflops": "peak bf16 TFLOP/s per GPU for MFU (0: from the GPU's name)",
    "train.max_bad_steps": "consecutive non-finite steps (each skipped on every rank) that stop the run",
    "train.activation_checkpointing": "recompute in backward: `full` keeps only each block's input, `selective` "
    "recomputes element-wise work and the experts' gate and up products, never a collective (docs/performance.md)",
    "train.ac_every": "checkpoint every N-th block (blocks 0, N, 2N, ...)",
    "train.compile": "torch.compile each block's norms and attention as one graph, dense FFNs, MoE gating (one device)",
}

# Every key the trainer logs (log.jsonl and tensorboard), NN standing for the layer index and COLL for a collective.
METRICS = [
    ("step", "scalar", "step", "the optimiser step the record belongs to"),
    ("train/loss", "scalar", "nats/token", "cross-entropy of the step (mean over micro-batches and ranks)"),
    ("train/aux_loss", "scalar", "-", "sum of the MoE layers' auxiliary losses, as added to the loss"),
    ("train/lr", "scalar", "-", "learning rate of the step"),
    ("train/grad_norm", "scalar", "-", "global gradient norm before clipping"),
    ("train/consumed_tokens", "scalar", "tokens", "training tokens read so far"),
    ("train/skipped_steps", "scalar", "steps", "steps skipped as non-finite so far"),
    ("valid/loss", "scalar", "nats/token", "validation cross-entropy"),
    ("valid/ppl", "scalar", "-", "validation perplexity, exp(valid/loss)"),
    ("perf/tokens_per_s", "scalar", "tokens/s", "training throughput over the logging window, all ranks"),
    ("perf/step_seconds", "scalar", "s", "mean wall-clock seconds per step over the window"),
    ("perf/peak_memory_gib", "scalar", "GiB", "CUDA allocator peak, or the process's peak RSS on CPU"),
    ("perf/mfu", "scalar", "-", "GPU only: model FLOPs per second over the peak bf16 FLOP/s"),
    ("moe/idle_time", "scalar", "-", "idle-time metric per expert: Σ over layers of max − min load"),
    ("moe/idle_time_device", "scalar", "-", "the same per device (each device's experts' load summed)"),
    ("moe/dead_experts", "scalar", "experts", "experts that got no token over the window, all layers"),
    ("moe/load_heatmap", "image", "-", "tensorboard only: load × n per layer (rows) and expert (columns)"),
    ("moe/layerNN/load", "per expert", "share", "load f_i over the window, summing to 1"),
    ("moe/layerNN/tokens_per_expert", "per expert", "tokens", "tokens routed to each expert over the window"),
    ("moe/layerNN/score_mean", "per expert", "-", "mean score per expert (AoE: the activation norm)"),
    ("moe/layerNN/ent_load", "scalar", "nats", "entropy of the load, Eq. 7 (log n when balanced)"),
    ("moe/layerNN/ent_conf", "scalar", "nats", "mean per-token entropy of the softmaxed scores, Eq. 8"),
    ("moe/layerNN/max_minus_min", "scalar", "share", "max − min load over experts (the layer's idle-time term)"),
    ("moe/layerNN/device_load", "per device", "share", "EP > 1: load of each device's experts"),
    ("moe/layerNN/device_max_minus_min", "scalar", "share", "EP > 1: max − min device load"),
    ("moe/layerNN/score_margin", "scalar", "-", "mean weakest selected minus strongest unselected score"),
    (
        "moe/layerNN/churn",
        "scalar",
        "share",
        "tokens of a fixed probe batch whose expert set changed since the last log",
    ),
    ("moe/layerNN/dead_experts", "scalar", "experts", "experts with no token over the window"),
    (
        "moe/layerNN/wasted_precompute",
        "scalar",
        "share",
        "AoE: share of the computed caches that unselected experts throw away",
    ),
    ("moe/layerNN/erc_loss", "scalar", "-", "ERC loss before its weight"),
    ("moe/layerNN/erc_eps", "scalar", "-", "mean ERC ε over experts (smaller: more specialised experts)"),
    ("moe/layerNN/bias", "per expert", "-", "`balance: bias`: the selection bias of each expert"),
    ("moe/layerNN/bias_max_abs", "scalar", "-", "`balance: bias`: the largest |b_i|"),
    ("moe/layerNN/density", "scalar", "share", "threshold selection: fired share of (token, expert) pairs"),
    ("moe/layerNN/threshold_lambda", "scalar", "-", "threshold selection: weight λ of its balancing loss"),
    ("moe/seconds/expert_max", "scalar", "s", "the slowest rank's seconds in its experts (logging step, all layers)"),
    ("moe/seconds/expert_min", "scalar", "s", "the fastest rank's seconds in its experts"),
    ("moe/seconds/expert_max_minus_min", "scalar", "s", "wall-clock idle time: expert_max − expert_min"),
    ("moe/seconds/combine_max", "scalar", "s", "the longest wait in the combine collective across ranks"),
    ("moe/seconds/combine_min", "scalar", "s", "the shortest wait in the combine collective"),
    (
        "moe/bytes_per_step/COLL/fwd",
        "scalar",
        "bytes",
        "bytes this rank sent in the collective COLL in forward, per step (EP > 1; docs/design.md section 2.3)",
    ),
    ("moe/bytes_per_step/COLL/bwd", "scalar", "bytes", "the same in backward"),
]


# The figures of `aoe-ep report`, by the names of `aoe_ep.analysis.report.FIGURES`: (file, what it draws, from which
# keys). A figure without an entry here, or an entry for a figure that no longer exists, is an error.
REPORT_FIGURES = {
    "loss": ("loss.png", "training and validation loss over steps", "`train/loss`, `valid/loss`"),
    "load heatmaps": (
        "load_heatmaps.png",
        "load × n per layer (rows) and expert (columns) at the `--steps` "
        "(default: first, middle, last logged step); 1 is balanced",
        "`moe/layerNN/load`",
    ),
    "load over training": (
        "load_over_training.png",
        "load × n per expert over steps, one panel per layer (the AoE paper's Fig. 3)",
        "`moe/layerNN/load`",
    ),
    "device load": (
        "device_load.png",
        "load of each device's experts over steps, one panel per layer",
        "`moe/layerNN/device_load`",
    ),
    "idle time": (
        "idle_time.png",
        "the idle-time metric per expert and per device over steps",
        "`moe/idle_time`, `moe/idle_time_device`",
    ),
    "entropy": (
        "entropy.png",
        "Ent_load and Ent_conf per layer over steps, against their maximum log n",
        "`moe/layerNN/ent_load`, `moe/layerNN/ent_conf`",
    ),
    "scores": (
        "scores.png",
        "mean score per expert over steps (the AoE paper's Fig. 4: AoE's activation norm, a router's logits)",
        "`moe/layerNN/score_mean`",
    ),
    "wait": (
        "wait.png",
        "measured expert and combine seconds, max and min across ranks, beside what the device load "
        "predicts (the fastest rank's expert seconds × max/min device load)",
        "`moe/seconds/...`, `moe/layerNN/device_load`",
    ),
    "bytes per collective": (
        "comm.png",
        "measured bytes per collective beside the communication model for the run's "
        "config (uniform routing; for `alltoall` the logged device load)",
        "`moe/bytes_per_step/COLL/fwd`, `moe/bytes_per_step/COLL/bwd`",
    ),
    "diagnostics": (
        "diagnostics.png",
        "the AoE diagnostics per layer over steps",
        "`moe/layerNN/score_margin`, `churn`, `dead_experts`, `wasted_precompute`",
    ),
    "bias": ("bias.png", "the balancing bias per expert over steps (`balance: bias`)", "`moe/layerNN/bias`"),
}


def metric_pattern(key: str) -> re.Pattern:
    """The regular expression a documented key stands for (NN: two digits; COLL: a collective's name)."""
    return re.compile("^" + re.escape(key).replace("NN", r"\d\d").replace("COLL", r"[a-z_]+") + "$")


def undocumented_metrics(keys) -> list[str]:
    """The logged keys no entry of `METRICS` covers."""
    patterns = [metric_pattern(k) for k, *_ in METRICS]
    return sorted(k for k in keys if not any(p.match(k) for p in patterns))


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(C.Config)
    out = {}
    for f in dataclasses.fields(C.Config):
        kind = hints[f.name]
        out[f.name] = next(a for a in typing.get_args(kind) if a is not type(None)) if typing.get_args(kind) else kind
    return out


def config_keys() -> dict[str, tuple[str, object]]:
    """Every config key as `section.field` -> (type name, default)."""
    keys = {}
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = hints[f.name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            name = (args[0].__name__ + " or null") if args else getattr(kind, "__name__", str(kind))
            keys[f"{section}.{f.name}"] = (name, default)
    return keys


def _fmt(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def render_config() -> str:
    keys = config_keys()
    missing = sorted(set(keys) - set(CONFIG_HELP))
    extra = sorted(set(CONFIG_HELP) - set(keys))
    if missing or extra:
        raise KeyError(f"aoe_ep/docsgen.py CONFIG_HELP is out of date: missing {missing}, unknown {extra}")
    lines = [
        "# Configuration keys",
        "",
        "Generated from the code by `python -m aoe_ep.docsgen`; do not edit by hand.",
        "",
        "A run's configuration is a YAML file (a preset name such as `tiny` or `paper/aoe_4b`, or a path) with "
        "one section per concern; `--set section.key=value` overrides one key. Every value is checked when the "
        "file is loaded, and a bad one is a single `aoe-ep: config error: section.key: ...` line.",
        "",
    ]
    for section, doc in SECTIONS.items():
        lines += [
            f"## `{section}`",
            "",
            doc,
            "",
            "| key | type | default | allowed | meaning |",
            "|---|---|---|---|---|",
        ]
        for key, (kind, default) in keys.items():
            if key.split(".")[0] != section:
                continue
            allowed = ", ".join(f"`{c}`" for c in CHOICES[key]) if key in CHOICES else ""
            lines.append(f"| `{key}` | {kind} | `{_fmt(default)}` | {allowed} | {CONFIG_HELP[key]} |")
        lines.append("")
    return "\n".join(lines)


def render_metrics() -> str:
    lines = [
        "# Logged metrics",
        "",
        "Generated from the code by `python -m aoe_ep.docsgen`; do not edit by hand.",
        "",
        "The trainer writes every key to `log.jsonl` (one JSON object per logging step) and to tensorboard "
        "(`tb/`). `NN` is the layer index (`layer00`, `layer01`, ...), `COLL` a collective of the dispatcher "
        "(`tokens`, `norms`, `sizes`, `counts`, `stats`, `probs`, `dispatch`, `combine`, `erc`). Statistics are "
        "those of the global batch over the logging window. Per-expert and per-device values are lists in "
        "`log.jsonl` and histograms in tensorboard.",
        "",
        "| key | kind | unit | meaning |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{key}` | {kind} | {unit} | {meaning} |" for key, kind, unit, meaning in METRICS]
    return "\n".join(lines + [""] + _render_report()) + "\n"


def _render_report() -> list[str]:
    """The figures and summary fields of `aoe-ep report`, from the report's own lists."""
    from aoe_ep.analysis.report import FIGURES, SUMMARY_ROWS

    names = [name for name, _ in FIGURES]
    missing, extra = sorted(set(names) - set(REPORT_FIGURES)), sorted(set(REPORT_FIGURES) - set(names))
    if missing or extra:
        raise KeyError(f"aoe_ep/docsgen.py REPORT_FIGURES is out of date: missing {missing}, unknown {extra}")
    lines = [
        "## The report's figures",
        "",
        "`aoe-ep report RUN_DIR` reads these keys from `log.jsonl` (or, without it, the scalars of the "
        "tensorboard events) and writes one PNG per figure beside `report.html`; a figure the run logged no key "
        "for is left out and named so on the page. With `--compare` every figure draws each run. "
        "See [reports.md](reports.md).",
        "",
        "| figure | file | what | keys |",
        "|---|---|---|---|",
    ]
    for name in names:
        file, meaning, keys = REPORT_FIGURES[name]
        lines.append(f"| {name} | `{file}` | {meaning} | {keys} |")
    lines += [
        "",
        "## The report's summary",
        "",
        "The table at the top of `report.html`, and `aoe-ep report --json` (which also holds "
        "`mean_max_minus_min` per layer, `run` and `source`):",
        "",
        "| field | meaning |",
        "|---|---|",
    ]
    lines += [f"| `{key}` | {label} |" for key, label, _ in SUMMARY_ROWS]
    return lines


PAGES = {"config.md": render_config, "metrics.md": render_metrics}


def stale_pages(docs_dir: Path = DOCS_DIR) -> list[str]:
    """The generated pages whose file differs from what the code writes now."""
    return [
        name
        for name, render in PAGES.items()
        if not (docs_dir / name).is_file() or (docs_dir / name).read_text(encoding="utf-8") != render()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aoe_ep.docsgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated page is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for name in stale:
            print(f"docs/{name} is out of date: run `python -m aoe_ep.docsgen`", file=sys.stderr)
        return 1 if stale else 0
    for name, render in PAGES.items():
        (DOCS_DIR / name).write_text(render(), encoding="utf-8")
        print(f"wrote docs/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
