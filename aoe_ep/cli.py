"""`aoe-ep` command line: `train`, `preprocess`, `params`, `bench layer`, `bench dispatch`.

Subcommands import their modules lazily: megatron-core takes seconds to import and `--help` should not wait.
"""

from __future__ import annotations

import argparse
import sys


def default_device() -> str:
    """The one place a device is chosen when the user names none."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _params(args: argparse.Namespace) -> int:
    from aoe_ep.config import count_parameters, load_config

    for name in args.config:
        cfg = load_config(name, args.overrides)
        count = count_parameters(cfg)
        print(f"{name}: total {count.total / 1e6:,.1f}M, active {count.active / 1e6:,.1f}M "
              f"(vocabulary counted once in total, twice in active); "
              f"touched per token {count.active_compute / 1e6:,.1f}M; as built, untied: {count.total_untied / 1e6:,.1f}M")
    return 0


def _bench_layer(args: argparse.Namespace) -> int:
    from aoe_ep.bench.layer import main

    main(args.cases, args.tokens, args.iters, args.rounds, args.device or default_device(), args.dtype, args.out)
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from aoe_ep.data import preprocess

    result = preprocess(args.input, args.output_prefix, args.tokenizer, jsonl_key=args.jsonl_key,
                        txt_mode=args.txt_mode)
    print(f"{result.prefix}.bin/.idx: {result.documents:,} documents, {result.tokens:,} tokens (eod included)"
          + (f"; skipped {result.skipped_empty:,} empty documents" if result.skipped_empty else ""))
    return 0


def _bench_dispatch(args: argparse.Namespace) -> int:
    from aoe_ep.bench.dispatch import main

    main(args.spec, args.tokens, args.iters, args.ep, args.out)
    return 0


def _train(args: argparse.Namespace) -> int:
    from aoe_ep.config import load_config
    from aoe_ep.train.checkpoint import CheckpointError
    from aoe_ep.train.guards import TrainingError
    from aoe_ep.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume)
    except CheckpointError as err:
        print(f"aoe-ep: checkpoint error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"aoe-ep: training error: {err}", file=sys.stderr)
        return 2
    if result.is_main:
        last_eval = next((loss for _, loss in reversed(result.evals) if loss is not None), None)
        print(f"trained to step {result.step} in {result.seconds:.1f}s"
              + (f"; validation loss {last_eval:.4f}" if last_eval is not None else "")
              + (f"; checkpoint {result.checkpoint}" if result.checkpoint else "")
              + f"; tensorboard --logdir {cfg.train.out_dir}/tb")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aoe-ep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="parameter counts of configs (presets in configs/ or YAML paths)")
    p.add_argument("config", nargs="+", help="preset name (e.g. paper/aoe_732m) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value; may repeat")
    p.set_defaults(func=_params)

    p = sub.add_parser("train", help="train a model (one process, or every rank under torchrun)")
    p.add_argument("--config", required=True, help="preset name (e.g. tiny, paper/aoe_732m) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value; may repeat")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the newest checkpoint under train.out_dir, or from the CHECKPOINT directory; "
                        "'--resume auto' starts fresh when there is none yet (for requeued jobs)")
    p.set_defaults(func=_train)

    p = sub.add_parser("preprocess", help="tokenize .txt/.jsonl files into a megatron-core .bin/.idx dataset")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help=".txt or .jsonl files, or directories searched recursively for them")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json")
    p.add_argument("--tokenizer", default="byte",
                   help="'byte', a tokenizers .json file or a sentencepiece .model file (default: byte)")
    p.add_argument("--jsonl-key", default="text", help="the field of each .jsonl line that holds the text")
    p.add_argument("--txt-mode", default="file", choices=["file", "paragraph"],
                   help="a .txt file is one document (file) or one per blank-line-separated block (paragraph)")
    p.set_defaults(func=_preprocess)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    b = bench.add_parser("layer", help="AoE vs MoE vs dense FFN throughput and memory, forward+backward")
    b.add_argument("--cases", help="YAML with the cases (default: configs/bench/layer.yaml)")
    b.add_argument("--tokens", type=int, help="tokens per step (default: from the cases file)")
    b.add_argument("--iters", type=int, default=2, help="steps per timed round")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    b.add_argument("--out", help="also write the results as JSON here")
    b.set_defaults(func=_bench_layer)

    b = bench.add_parser("dispatch", help="allgather vs alltoall dispatcher: bytes per token and step time, EP=1,2,4")
    b.add_argument("--spec", help="YAML with the layer and EP sizes (default: configs/bench/dispatch.yaml)")
    b.add_argument("--tokens", type=int, help="tokens per rank (default: from the spec)")
    b.add_argument("--iters", type=int, default=3, help="timed steps per configuration")
    b.add_argument("--ep", type=int, nargs="+", help="EP sizes (default: from the spec)")
    b.add_argument("--out", help="also write the results as JSON here")
    b.set_defaults(func=_bench_dispatch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from aoe_ep.config import ConfigError
    from aoe_ep.data.errors import DataError

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"aoe-ep: config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"aoe-ep: data error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
