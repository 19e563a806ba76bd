"""``distcur <stage>``: one subcommand per stage, each defined in ``distcur/commands/<stage>.py``.

A command module exposes ``register(subparsers)`` that adds its parser and sets
``func(args) -> int``. Modules are imported lazily so ``distcur --help`` stays fast and a
stage's heavy imports (Ray, torch, MetaWorld) load only when that stage runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distcur import __version__
from distcur.logs import setup_logging

COMMANDS = (
    "ingest",
    "train",
    "evaluate",
    "embed",
    "score",
    "select",
    "datamodel",
    "rebalance",
    "sweep",
    "demo",
    "report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distcur", description="Curate robot demonstration data on Ray.")
    parser.add_argument("--version", action="version", version=f"distcur {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, Ray's own log lines too")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are drawn only when stderr is a terminal)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"distcur.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"distcur.commands.{name}":
                continue  # stage not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, show_progress=not args.no_progress)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"distcur {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
