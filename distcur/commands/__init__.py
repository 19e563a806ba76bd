"""One module per ``distcur`` subcommand; the options several stages share."""

from __future__ import annotations


def add_rerun_options(parser) -> None:
    """``--force`` and ``--verify``: when a stage counts its committed output as up to date."""
    parser.add_argument("--force", action="store_true", help="recompute even when the committed output matches")
    parser.add_argument("--verify", action="store_true",
                        help="count a matching committed output as up to date only when its checksums and row "
                             "counts verify (reads all of it), else rebuild it")


def output_store(uri: str, args):
    """The store a stage writes, opened with the stage's ``--force`` / ``--verify``."""
    from distcur.store import Store

    return Store(uri, force=args.force, verify_done=args.verify)
