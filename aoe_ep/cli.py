"""`aoe-ep`: train, preprocess, eval, generate, lm-eval, router-free, toy, report, params, plan, export, import,
bench layer, bench dispatch.

Subcommands import their modules lazily: megatron-core takes seconds to import and `--help` should not wait.
"""

from __future__ import annotations

import argparse
import os
import sys


class CommandError(Exception):
    """Bad input to a subcommand that argparse cannot see (e.g. a prompt too long for the model): one line, exit 2."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def default_device() -> str:
    """The one place a device is chosen when the user names none."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _params(args: argparse.Namespace) -> int:
    from aoe_ep.config import count_parameters, load_config

    for name in args.config:
        cfg = load_config(name, args.overrides)
        count = count_parameters(cfg)
        print(
            f"{name}: total {count.total / 1e6:,.1f}M, active {count.active / 1e6:,.1f}M "
            f"(vocabulary counted once in total, twice in active); "
            f"touched per token {count.active_compute / 1e6:,.1f}M; as built, untied: {count.total_untied / 1e6:,.1f}M"
        )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from aoe_ep.config import load_config
    from aoe_ep.plan.report import plan_all, render

    if args.placement is not None:
        from aoe_ep.plan.placement import placement_gain, render_gain

        if args.config is not None:
            raise CommandError("--placement RUN_DIR reads a run, not a config: drop the CONFIG argument")
        try:
            print(render_gain(placement_gain(args.placement, args.ep), args.json))
        except ValueError as err:
            raise CommandError(str(err)) from None
        return 0
    if args.config is None:
        raise CommandError("name a CONFIG (preset or YAML path), or a run with --placement RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    if args.ep is not None and args.dp is not None:
        plans = plan_all(cfg, args.ep, args.dp, args.micro_batch, args.gpu, args.hot_expert_share, args.ac)
    else:  # a default table: keep the layouts the batch divides and say which were skipped
        plans, skipped = _dividing_plans(cfg, args)
        if skipped:
            print(
                f"aoe-ep plan: skipped {len(skipped)} layout(s) the batch does not divide: {'; '.join(skipped)}",
                file=sys.stderr,
            )
    print(render(args.config, cfg, plans, args.json))
    return 0


def _dividing_plans(cfg, args: argparse.Namespace) -> tuple[list, list[str]]:
    from aoe_ep.config import ConfigError
    from aoe_ep.plan.report import layouts, plan_all

    plans, skipped, first_error = [], [], None
    for ep, dp in layouts(cfg, args.ep, args.dp):
        try:
            plans += plan_all(cfg, ep, dp, args.micro_batch, args.gpu, args.hot_expert_share, args.ac)
        except ConfigError as err:
            if not str(err).startswith("train.global_batch_tokens"):
                raise
            first_error = first_error or err
            skipped.append(f"EP {ep} x DP {dp}")
    if not plans:
        raise first_error
    return plans, skipped


def _bench_layer(args: argparse.Namespace) -> int:
    from aoe_ep.bench.layer import main

    main(args.cases, args.tokens, args.iters, args.rounds, args.device or default_device(), args.dtype, args.out)
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from aoe_ep.data import preprocess

    try:
        result = preprocess(
            args.input, args.output_prefix, args.tokenizer, jsonl_key=args.jsonl_key, txt_mode=args.txt_mode
        )
    except OSError as err:
        raise CommandError(
            f"--output-prefix {args.output_prefix}: cannot write {err.filename or ''}: {err.strerror or err}"
        ) from None
    print(
        f"{result.prefix}.bin/.idx: {result.documents:,} documents, {result.tokens:,} tokens (eod included)"
        + (f"; skipped {result.skipped_empty:,} empty documents" if result.skipped_empty else "")
    )
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from aoe_ep.bench.train import main

    try:
        main(args.models, args.rounds, args.device or default_device(), args.out)
    except ValueError as err:
        raise CommandError(str(err)) from None
    return 0


def _bench_dispatch(args: argparse.Namespace) -> int:
    from aoe_ep.bench.dispatch import main

    main(args.spec, args.tokens, args.iters, args.ep, args.out)
    return 0


def _train(args: argparse.Namespace) -> int:
    from aoe_ep.config import load_config
    from aoe_ep.train.trainer import Interrupted, train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume)
    except Interrupted as stop:
        if _is_main_process():
            print(f"aoe-ep train: {stop}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.is_main:
        last_eval = next((loss for _, loss in reversed(result.evals) if loss is not None), None)
        print(
            f"trained to step {result.step} in {result.seconds:.1f}s"
            + (f"; validation loss {last_eval:.4f}" if last_eval is not None else "")
            + (f"; checkpoint {result.checkpoint}" if result.checkpoint else "")
            + f"; tensorboard --logdir {cfg.train.out_dir}/tb"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    import math

    from aoe_ep.eval.perplexity import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        batch_size=args.batch_size,
        expert_parallel_size=args.expert_parallel_size,
        device=args.device,
    )
    if _is_main_process():
        if args.json:
            print(json.dumps(result.as_dict()))
        else:
            source = ", ".join(result.data) if result.data else "the run's validation split"
            print(
                f"{result.checkpoint} (step {result.step}) on {source}: loss {result.loss:.4f}, "
                f"perplexity {result.perplexity:.3f}, {result.tokens:,} tokens, "
                f"{result.loss / math.log(2):.4f} bits per token"
            )
    return 0


def _generate(args: argparse.Namespace) -> int:
    import math

    from aoe_ep.data import build_tokenizer
    from aoe_ep.eval.generate import SamplingConfig, generate
    from aoe_ep.eval.loading import open_checkpoint

    if args.greedy and args.top_p is not None:
        raise CommandError("--greedy takes the most likely token, --top-p samples: give one of them")
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        raise CommandError(f"--temperature: must be a positive finite number, got {args.temperature}")
    if args.top_p is not None and not (0.0 < args.top_p <= 1.0):
        raise CommandError(f"--top-p: must lie in (0, 1], got {args.top_p}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CommandError(
            f"--prompt: not valid UTF-8 text (byte {err.object[err.start : err.end]!r} at position {err.start})"
        ) from None
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        greedy=args.top_p is None or args.greedy,
        temperature=args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
    )
    try:
        sampling.validate()
    except ValueError as err:
        raise CommandError(str(err)) from None
    with open_checkpoint(args.checkpoint, expert_parallel_size=1, device=args.device) as loaded:
        tokenizer = build_tokenizer(loaded.cfg.data.tokenizer)
        prompt = tokenizer.encode(args.prompt)
        try:
            new = generate(loaded.model, prompt, sampling, stop_id=tokenizer.eod)
        except ValueError as err:
            raise CommandError(str(err)) from None
        print(args.prompt + tokenizer.decode(new))
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    try:
        from aoe_ep.eval.harness import main
    except ImportError as err:
        if args.harness_args[:1] in (["--help"], ["-h"]):
            print(
                "usage: aoe-ep lm-eval [lm-evaluation-harness arguments], e.g. --model aoe-ep --model_args "
                "checkpoint=runs/tiny --tasks arc_easy\n(lm-evaluation-harness is not installed here, so its own "
                f"options cannot be listed: {err}; pip install -e '.[eval]')"
            )
            return 0
        raise CommandError(f"needs lm-evaluation-harness ({err}): pip install -e '.[eval]'") from None
    main(args.harness_args)
    return 0


def _router_free(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tqdm import tqdm

    from aoe_ep.analysis.router_free import (
        ALL_NODES,
        LOW_RANK_NODE,
        check_d_low,
        evaluate_node,
        load_mixtral,
        read_text_ids,
        windows,
    )
    from aoe_ep.data import build_tokenizer

    every = ALL_NODES + ((LOW_RANK_NODE,) if args.d_low is not None else ())
    nodes = list(every) if "all" in args.node else list(dict.fromkeys(args.node))
    if LOW_RANK_NODE in nodes and args.d_low is None:
        raise CommandError(f"--node {LOW_RANK_NODE} needs --d-low R (the rank of the factorised W_g)")
    spec = args.tokenizer
    if spec is None:
        found = [
            p for p in (Path(args.hf_dir) / "tokenizer.json", Path(args.hf_dir) / "tokenizer.model") if p.is_file()
        ]
        if not found:
            raise CommandError(
                f"{args.hf_dir} has no tokenizer.json or tokenizer.model: pass --tokenizer "
                f"(e.g. 'byte' for the demo checkpoints)"
            )
        spec = str(found[0])
    try:
        model = load_mixtral(args.hf_dir, device=args.device or default_device())
        ids = read_text_ids(args.text, build_tokenizer(spec), args.max_bytes)
        check_d_low(args.d_low, model.config.hidden_size, model.config.intermediate_size)
        seq_len = min(args.seq_len, model.config.max_position_embeddings)
        results = []
        with tqdm(
            total=len(nodes) * len(windows(ids, seq_len)), unit="window", desc="router-free", dynamic_ncols=True
        ) as bar:
            for node in nodes:
                results.append(
                    evaluate_node(model, ids, node, args.norm, args.gate, seq_len, progress=bar, d_low=args.d_low)
                )
    except ValueError as err:
        raise CommandError(str(err)) from None
    if args.json:
        print(json.dumps([r.as_dict() for r in results]))
        return 0
    rank = f", W_g at rank {args.d_low} (W_down W_up)" if args.d_low is not None else ""
    print(f"{args.hf_dir}: {results[0].tokens:,} predicted tokens, norm {args.norm}, gates {args.gate}{rank}")
    print(f"{'node':<14}{'perplexity':>12}{'loss':>9}{'overlap w. router':>19}{'seconds':>9}")
    for r in results:
        print(f"{r.node:<14}{r.perplexity:>12.3f}{r.loss:>9.4f}{r.router_overlap:>19.3f}{r.seconds:>9.2f}")
    return 0


def _toy(args: argparse.Namespace) -> int:
    import json

    from aoe_ep.analysis.toy import ToyConfig, describe, run_toy

    cfg = ToyConfig(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, dim=args.dim, seed=args.seed)
    try:
        result = run_toy(args.out, cfg)
    except OSError as err:
        raise CommandError(f"--out {args.out}: cannot write {err.filename or ''}: {err.strerror or err}") from None
    if args.json:
        print(json.dumps(result))
        return 0
    print("\n".join(describe(result["summary"])))
    print(f"figures: {', '.join(result['figures'])}; data: {result['json']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from aoe_ep.analysis.report import describe, json_safe, write_report

    result = write_report(args.run_dir, args.out, args.compare or (), args.steps, progress=not args.json)
    if args.json:
        print(json.dumps(json_safe(result), allow_nan=False))
        return 0
    print(describe(result))
    print(f"report: {result['out']}/report.html")
    return 0


def _export(args: argparse.Namespace) -> int:
    from aoe_ep.hf.errors import ConversionError
    from aoe_ep.hf.export import export_checkpoint

    try:
        result = export_checkpoint(args.checkpoint, args.out_dir, args.format, args.max_shard_size)
    except ConversionError as err:
        raise CommandError(str(err)) from None
    remote = " (load with trust_remote_code=True)" if result.format == "aoe_ep" else ""
    print(f"{result.out_dir}: {result.format}{remote}; {', '.join(result.files)}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from aoe_ep.hf.errors import ConversionError
    from aoe_ep.hf.importer import import_hf

    try:
        if args.to == "aoe":
            from aoe_ep.hf.upcycle import describe, upcycle_import

            result, report = upcycle_import(args.hf_dir, args.out_dir, args.d_low, tokenizer=args.tokenizer)
            print(describe(report))
        else:
            if args.d_low is not None:
                raise ConversionError("--d-low goes with --to aoe (the rank of the factorised gate projections)")
            result = import_hf(args.hf_dir, args.out_dir, tokenizer=args.tokenizer)
    except ConversionError as err:
        raise CommandError(str(err)) from None
    kind = f"{result.model_type} upcycled to AoE" if args.to == "aoe" else result.model_type
    print(f"{result.out_dir}: {kind}, imported as a run directory; checkpoint {result.checkpoint}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _add_overrides(p: argparse.ArgumentParser) -> None:
    """`--set SECTION.FIELD=VALUE`, repeatable: the config overrides every config-taking subcommand accepts."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config value; may repeat",
    )


def build_parser() -> argparse.ArgumentParser:
    from aoe_ep import __version__

    parser = argparse.ArgumentParser(prog="aoe-ep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"aoe-ep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="parameter counts of configs (presets in configs/ or YAML paths)")
    p.add_argument("config", nargs="+", help="preset name (e.g. paper/aoe_732m) or YAML path")
    _add_overrides(p)
    p.set_defaults(func=_params)

    p = sub.add_parser(
        "plan",
        help="per-rank memory, FLOPs, communication and step time of a config under DP x EP; "
        "with --placement, the idle-time gain of a balanced expert placement on a run",
    )
    p.add_argument("config", nargs="?", help="preset name (e.g. paper/aoe_4b) or YAML path")
    p.add_argument(
        "--placement",
        metavar="RUN_DIR",
        help="a run's out_dir (or checkpoint): per layer the per-device max - min of its measured load "
        "under the contiguous and the balanced placement, and the predicted idle-time gain",
    )
    p.add_argument(
        "--ep", type=int, help="expert-parallel size (default: a table over 1, 2, 4, 8; with --placement, the run's)"
    )
    p.add_argument("--dp", type=int, help="data-parallel size (default: a few)")
    p.add_argument(
        "--micro-batch", type=int, help="sequences per rank and micro-batch (default: train.micro_batch_size)"
    )
    p.add_argument("--gpu", default="h100", help="hardware constants: h100, h200 or a100 (default: h100)")
    p.add_argument(
        "--hot-expert-share",
        type=float,
        metavar="S",
        help="skewed routing: one expert gets share S of the routed rows (default: uniform)",
    )
    p.add_argument(
        "--ac",
        choices=("none", "selective", "full", "auto"),
        help="activation checkpointing (default: train.activation_checkpointing; every N-th block: --set "
        "train.ac_every=N); auto: per layout the mode and micro-batch that fit with the shortest step",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per layout (a list)")
    _add_overrides(p)
    p.set_defaults(func=_plan)

    p = sub.add_parser("train", help="train a model (one process, or every rank under torchrun)")
    p.add_argument("--config", required=True, help="preset name (e.g. tiny, paper/aoe_732m) or YAML path")
    _add_overrides(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint under train.out_dir, or from the CHECKPOINT directory; "
        "'--resume auto' starts fresh when there is none yet (for requeued jobs)",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint (one process, or every rank under torchrun)")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint directory, or a run directory (its newest checkpoint)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PREFIX_OR_TEXT",
        help="megatron-core dataset prefixes (PREFIX.bin/.idx) or .txt/.jsonl files; default: the run's "
        "validation split, exactly as the trainer evaluates it",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="B",
        help="sequences per rank and micro-batch (default: the run's train.micro_batch_size)",
    )
    p.add_argument(
        "--expert-parallel-size",
        type=_positive_int,
        metavar="EP",
        help="default: the checkpoint's when it divides the number of processes, else 1",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the checkpoint config's train.device")
    p.add_argument("--json", action="store_true", help="print one JSON object: loss, perplexity, tokens, ...")
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="continue a prompt with a checkpoint (greedy or top-p sampling, KV cache)")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint directory, or a run directory (its newest checkpoint)",
    )
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the nucleus of mass P (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits before top-p sampling")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default without --top-p)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the checkpoint config's train.device")
    p.set_defaults(func=_generate)

    p = sub.add_parser(
        "lm-eval", help="lm-evaluation-harness with the model 'aoe-ep' registered; arguments go to it", add_help=False
    )
    p.add_argument(
        "harness_args",
        nargs=argparse.REMAINDER,
        help="e.g. --model aoe-ep --model_args checkpoint=runs/tiny --tasks arc_easy",
    )
    p.set_defaults(func=_lm_eval)

    p = sub.add_parser(
        "router-free",
        help="Section 3.1: remove a Mixtral checkpoint's routers, let experts choose "
        "themselves by activation norm; perplexity per pause node",
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="a local transformers MixtralForCausalLM directory")
    p.add_argument(
        "--node",
        nargs="+",
        required=True,
        choices=["xWg", "xWp", "silu_xWg", "silu_xWg_xWp", "output", "xWdown", "router", "all"],
        help="pause node(s) whose activation norm ranks the experts; 'router': as trained; 'all'; "
        "'xWdown' (with --d-low): AoE's cache x W_down",
    )
    p.add_argument(
        "--d-low",
        type=_positive_int,
        metavar="R",
        help="replace every expert's W_g by its rank-R factors W_down W_up (truncated SVD, as `import --to aoe "
        "--d-low R` writes them); opens the node xWdown",
    )
    p.add_argument("--norm", default="l2", choices=["l2", "l1", "linf"], help="activation norm (default l2)")
    p.add_argument(
        "--gate",
        default="softmax",
        choices=["softmax", "uniform"],
        help="weights of the chosen experts: softmax of their norms (AoE) or equal",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        help="text to measure perplexity on (default: the 64 KiB of standard-library sources the built-in corpus "
        "holds out; a larger --max-bytes reaches into files it trains on)",
    )
    p.add_argument("--max-bytes", type=_positive_int, default=65536, help="bytes of the text used (default 65536)")
    p.add_argument(
        "--tokenizer",
        help="aoe-ep tokenizer spec ('byte', a .json or .model file); default: the "
        "directory's tokenizer.json / tokenizer.model",
    )
    p.add_argument("--seq-len", type=_positive_int, default=512, help="window length (capped by the model's)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON list: per node perplexity, loss, tokens, router_overlap, seconds, load, d_low",
    )
    p.set_defaults(func=_router_free)

    p = sub.add_parser("toy", help="Appendix B: tiny AoE vs MoE classifiers on Gaussian classes, in two stages")
    p.add_argument("--out", default="runs/toy", help="directory for toy_load.png, toy_score.png, toy.json")
    p.add_argument("--stage1-steps", type=_positive_int, default=300, help="steps on classes 1 and 2")
    p.add_argument("--stage2-steps", type=_positive_int, default=600, help="steps once class 3 is added")
    p.add_argument("--dim", type=_positive_int, default=16, help="input dimension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary (per model and stage) as JSON")
    p.set_defaults(func=_toy)

    p = sub.add_parser("report", help="load report of a run (also while it trains): report.html and PNG figures")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a train.out_dir (reads its log.jsonl, else its tb/ events)")
    p.add_argument("--out", metavar="DIR", help="where report.html and the figures go (default: RUN_DIR/report)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="other run directories drawn beside it")
    p.add_argument(
        "--steps",
        nargs="+",
        type=int,
        metavar="S",
        help="steps of the load heatmaps (the nearest logged; default: first, middle, last)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the summary as one JSON object (final_loss, final_valid_loss, idle_time_expert, "
        "idle_time_device, worst_layer, ...; with --compare a 'compare' list of the others)",
    )
    p.set_defaults(func=_report)

    p = sub.add_parser("preprocess", help="tokenize .txt/.jsonl files into a megatron-core .bin/.idx dataset")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help=".txt or .jsonl files, or directories searched recursively for them",
    )
    p.add_argument(
        "--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json"
    )
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte', a tokenizers .json file or a sentencepiece .model file (default: byte)",
    )
    p.add_argument("--jsonl-key", default="text", help="the field of each .jsonl line that holds the text")
    p.add_argument(
        "--txt-mode",
        default="file",
        choices=["file", "paragraph"],
        help="a .txt file is one document (file) or one per blank-line-separated block (paragraph)",
    )
    p.set_defaults(func=_preprocess)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model directory (Llama, Mixtral, or the "
        "aoe_ep architecture with its modeling code)",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a checkpoint directory, or a run directory (its newest checkpoint); any training layout",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) directory")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "llama", "mixtral", "aoe_ep"],
        help="auto: llama for dense models, mixtral where exact, else aoe_ep (trust_remote_code)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="safetensors shard size above which weights are split, with an index (default 5GB)",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "import",
        help="a Mixtral- or Llama-format Hugging Face directory becomes a run directory; "
        "--to aoe upcycles a Mixtral into AoE",
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="a local transformers model directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) run directory")
    p.add_argument(
        "--to",
        default="same",
        choices=["same", "aoe"],
        help="same: the model as it is; aoe: each expert's W_g factorised by truncated SVD into "
        "W_down·W_up of rank --d-low, the router dropped",
    )
    p.add_argument("--d-low", type=_positive_int, metavar="R", help="rank of the AoE factorisation (with --to aoe)")
    p.add_argument(
        "--tokenizer",
        help="aoe-ep tokenizer spec ('byte', a .json or .model file); default: the "
        "directory's tokenizer.json / tokenizer.model",
    )
    p.set_defaults(func=_import)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    b = bench.add_parser("layer", help="AoE vs MoE vs dense FFN throughput and memory, forward+backward")
    b.add_argument(
        "--cases", help="YAML file or preset with the cases (default: the preset bench/layer; bench/gpu for CUDA)"
    )
    b.add_argument("--tokens", type=int, help="tokens per step (default: from the cases file)")
    b.add_argument("--iters", type=int, default=1, help="steps per timed round")
    b.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="interleaved rounds: tokens/s are medians, ratios the median of the per-round ratios",
    )
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    b.add_argument("--out", help="also write the results as JSON here")
    b.set_defaults(func=_bench_layer)

    b = bench.add_parser(
        "train",
        help="activation checkpointing (none, selective, full) and torch.compile side by "
        "side: tokens/s and kept activation memory of whole decoders, forward+backward",
    )
    b.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        help="'tiny (AoE)', '732M slice, AoE', '732M slice, MoE' (default: all three)",
    )
    b.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default: 5)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--out", help="also write the results as JSON here")
    b.set_defaults(func=_bench_train)

    b = bench.add_parser("dispatch", help="allgather vs alltoall dispatcher: bytes per token and step time, EP=1,2,4")
    b.add_argument(
        "--spec", help="YAML file or preset with the layer and EP sizes (default: the preset bench/dispatch)"
    )
    b.add_argument("--tokens", type=int, help="tokens per rank (default: from the spec)")
    b.add_argument("--iters", type=int, default=3, help="timed steps per configuration")
    b.add_argument("--ep", type=int, nargs="+", help="EP sizes (default: from the spec)")
    b.add_argument("--out", help="also write the results as JSON here")
    b.set_defaults(func=_bench_dispatch)
    return parser


HEAVY_COMMANDS = ("train", "bench")  # long work: on the CPU, worth the allocator (aoe_ep/cpu_allocator.py)


def _runs_on_cpu(args: argparse.Namespace) -> bool:
    """Whether a heavy command computes on the CPU: `train` by its config's train.device, `bench layer` by --device
    (unset or auto: CPU when torch sees no CUDA device); `bench dispatch` runs gloo ranks on the CPU. A config that
    does not load counts as not (the command reports its error itself)."""
    if args.command == "train":
        from aoe_ep.config import ConfigError, load_config

        try:
            want = load_config(args.config, args.overrides).train.device
        except ConfigError:
            return False
    else:
        want = args.device if args.bench == "layer" else "cpu"
    return (default_device() if want in (None, "auto") else want) == "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """argparse, except that everything after `lm-eval` goes to lm-evaluation-harness untouched (argparse would
    take its options, `--model aoe-ep` or `--help`, as its own)."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["lm-eval"]:
        rest = words[1:]
        return argparse.Namespace(
            command="lm-eval", func=_lm_eval, harness_args=rest[1:] if rest[:1] == ["--"] else rest
        )
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if argv is None and sys.argv[1:2] and sys.argv[1] in HEAVY_COMMANDS and _runs_on_cpu(args):
        from aoe_ep import cpu_allocator

        cpu_allocator.ensure_allocator(sys.argv[1:])  # re-executes this command once, if it changes anything
        if int(os.environ.get("RANK", "0")) == 0:
            print(cpu_allocator.announce(), file=sys.stderr, flush=True)
    from aoe_ep.config import ConfigError
    from aoe_ep.data.errors import DataError
    from aoe_ep.train.checkpoint import CheckpointError
    from aoe_ep.train.guards import TrainingError
    from aoe_ep.train.run_log import ReportError

    # one line and exit code 2 for every error a user can fix
    prefixes = (
        (CommandError, f"aoe-ep {args.command}: error"),
        (CheckpointError, "aoe-ep: checkpoint error"),
        (TrainingError, "aoe-ep: training error"),
        (ConfigError, "aoe-ep: config error"),
        (DataError, "aoe-ep: data error"),
        (ReportError, "aoe-ep: report error"),
    )
    try:
        return args.func(args)
    except tuple(kind for kind, _ in prefixes) as err:
        prefix = next(text for kind, text in prefixes if isinstance(err, kind))
        print(f"{prefix}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aoe-ep {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
