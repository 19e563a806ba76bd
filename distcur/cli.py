"""``distcur <stage>``: one subcommand per stage, each defined in ``distcur/commands/<stage>.py``.

A command module exposes ``register(subparsers)`` that adds its parser and sets
``func(args) -> int``. Modules are imported lazily so ``distcur --help`` stays fast and a
stage's heavy imports (Ray, torch, MetaWorld) load only when that stage runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

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
    "verify",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distcur", description="Curate robot demonstration data on Ray.")
    parser.add_argument("--version", action="version", version=f"distcur {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, Ray's own log lines too")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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
    except Exception as e:
        message = describe(e, args)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"distcur {args.command}: error: {message}", file=sys.stderr)
        return 2


def describe(error: BaseException, args: argparse.Namespace) -> str | None:
    """One line for an error a user can cause (bad input, config, store, checkpoint, S3 or network
    trouble), or None for anything else: a bug, whose traceback is shown.

    ValueError covers the project's own input errors (configs, damaged tables and manifests,
    unreadable checkpoints, RLDS and schema errors); OSError covers files, S3 and the network,
    with the S3 endpoint and bucket added. An error raised in a Ray task is reported as its cause."""
    cause = getattr(error, "cause", None)
    if type(error).__module__.startswith("ray.") and isinstance(cause, BaseException):
        error = cause
    from distcur.deps import EXTRA_OF, MissingDependencyError, install_hint

    if isinstance(error, MissingDependencyError):
        return str(error)
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in EXTRA_OF:
        return f"the optional package {error.name.split('.')[0]!r} is not installed: {install_hint(error.name)}"
    if isinstance(error, ValueError):
        return " ".join(str(error).split("\n"))
    if isinstance(error, OSError):
        from distcur.fs import s3_endpoint

        uri = str(getattr(args, "store", None) or getattr(args, "out", None) or "")
        if uri.startswith("s3://") or "AWS Error" in str(error):
            bucket = uri[len("s3://"):].split("/", 1)[0] if uri.startswith("s3://") else "?"
            return f"{error} (S3 endpoint {s3_endpoint() or 'AWS default'}, bucket {bucket!r})"
        return str(error)
    return None


if __name__ == "__main__":
    sys.exit(main())
