"""``distcur report [RUN ...]``: one HTML page comparing what a store holds.

    distcur report --store ./store                    every run in the store
    distcur report --store ./store demo               the demo's evals/demo and its demo-<method> tables
    distcur report --store ./store iwr br results     selections/scores iwr and br, evals/results

A RUN names committed tables under ``evals/``, ``scores/``, ``selections/`` and
``datamodels/`` (and takes ``<RUN>-<method>`` ones too, what ``distcur demo`` writes). The page
shows success per method (every seed, 95% intervals), success against the selected share, proxy
loss against success, each selection's make-up and their overlaps, score distributions on a
common percentile scale, and the datamodels' LDS and split-half reliability; what each figure
means: docs/tutorial.md, the store layout: docs/store.md.
"""

from __future__ import annotations

import argparse

from distcur.config import DEFAULT_STORE


def register(sub) -> None:
    p = sub.add_parser("report", help="HTML report comparing a store's runs (success, selections, scores)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN", help="runs to compare (default: every run in the store)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--out", default=None,
                   help="local HTML path (default: reports/<RUN+RUN...|store>.html in the store)")
    p.set_defaults(func=run)


def run(args) -> int:
    from distcur.stages.report import write_report
    from distcur.store import Store

    print(write_report(Store(args.store), args.runs, args.out))
    return 0
