"""The `esp-bench` command: `esp-bench run ...` (the default), `esp-bench serve ...` and `esp-bench plot ...`."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from . import engine_bench, plots, serve_bench
from .common import BenchError

SUBCOMMANDS = {"run": engine_bench, "serve": serve_bench, "plot": plots}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esp-bench",
        description="Benchmarks of speculative decoding on Spec-Bench prompts. Without a subcommand, `run`.",
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands written before the subcommands existed (`esp-bench --method ...`) still mean `run`.
    words = argv if argv[:1] and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help")) else ["run", *argv]
    try:
        args = build_parser().parse_args(words)
    except SystemExit as exc:  # argparse already printed its message (or --help)
        return int(exc.code or 0)
    try:
        return SUBCOMMANDS[args.subcommand].run(args, shlex.join(["esp-bench", *argv]))
    except BenchError as exc:
        print(f"esp-bench {args.subcommand}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
