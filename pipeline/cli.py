"""`pipeline` command line: one subcommand per stage, each a thin layer over one call.

Every stage module exposes ``register(subparsers)``, which adds its subcommands
and sets ``func`` (a callable taking the parsed args and returning an exit code).
Heavy imports (torch, DALI, Ray) happen inside those functions, so ``pipeline
--help`` and bad-argument errors are instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import __version__
from pipeline.errors import ArgumentParser, UserError

# Modules that contribute subcommands, in the order of the data flow.
_COMMAND_MODULES = (
    "pipeline.shard.command",  # shard, verify
    "pipeline.train.command",  # train, evaluate
    "pipeline.train.sweep",  # sweep
    "pipeline.train.runs",  # runs
    "pipeline.train.tracking_command",  # tracking sync
    "benchmarks.command",  # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pipeline",
        description="Shard image collections, load them with DALI or PyTorch, train on Ray, track in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only tolerate the module itself being absent (e.g. benchmarks/ not installed),
            # never a missing dependency inside it.
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"pipeline {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)  # what a command keeps of its work, if it says
        print(f"pipeline {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
