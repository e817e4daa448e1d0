"""`aoe-ep` command line: `aoe-ep params CONFIG`, `aoe-ep bench layer`.

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aoe-ep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="parameter counts of configs (presets in configs/ or YAML paths)")
    p.add_argument("config", nargs="+", help="preset name (e.g. paper/aoe_732m) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value; may repeat")
    p.set_defaults(func=_params)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from aoe_ep.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"aoe-ep: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
