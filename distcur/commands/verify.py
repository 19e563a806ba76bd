"""``distcur verify``: read every part of committed tables and check them against their manifests.

    distcur verify --store URI [KEY ...]

Checks that each part exists with its recorded size and sha256, reads as Parquet with its
recorded rows, and that the rows add up to the manifest's. Exit code 0 when every table is
intact, 1 when one is damaged (each problem on its own line, naming file and how to rebuild).
"""

from __future__ import annotations

import sys

from distcur.config import DEFAULT_STORE


def register(sub) -> None:
    p = sub.add_parser("verify", help="check the checksums and row counts of committed tables")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("keys", nargs="*", metavar="KEY", help="table keys, e.g. steps/source=x (default: all)")
    p.set_defaults(func=run)


def run(args) -> int:
    from distcur.store import Store

    store = Store(args.store)
    keys = args.keys or store.keys()
    if not keys:
        raise FileNotFoundError(f"no committed table under {store.uri}")
    damaged = 0
    for key in keys:
        problems = store.verify(key)
        damaged += bool(problems)
        if problems:
            print(f"DAMAGED {key}")
            for problem in problems:
                print(f"  {problem}")
        else:
            m = store.manifest(key)
            print(f"ok      {key} ({m.rows} rows, {len(m.files)} files)")
    print(f"{len(keys) - damaged} of {len(keys)} tables intact", file=sys.stderr)
    return 1 if damaged else 0
