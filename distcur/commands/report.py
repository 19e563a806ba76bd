"""``distcur report RUN``: an HTML page of a run's scores, selections and success."""

from __future__ import annotations

from distcur.config import DEFAULT_STORE


def register(sub) -> None:
    p = sub.add_parser("report", help="HTML report of a run (score histograms, selection composition, success)")
    p.add_argument("run", help="run name, e.g. 'demo'")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--out", default=None, help="local HTML path (default: reports/<run>.html in the store)")
    p.set_defaults(func=run)


def run(args) -> int:
    from distcur.report import write_report
    from distcur.store import Store

    print(write_report(Store(args.store), args.run, args.out))
    return 0
