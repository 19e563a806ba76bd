"""``distcur rebalance``: group weights for imbalanced demonstrations -> a weights table.

    distcur rebalance --method {frequency,dro,metagrad} --store URI --run NAME
                      [--groups task|source|kmeans] [--k K] [--sources S ...] [--embeddings ENCODER]
                      [--config YAML] [--seed N] [--force]

Writes ``selections/<run>`` (source, episode, step, weight) for ``distcur train --selection``
and prints the groups, their sizes and weights (and the chosen k for k-means) as JSON.
Command-line flags override the YAML; a rerun with the same config and inputs is skipped.
"""

from __future__ import annotations

import json

from distcur.config import DEFAULT_STORE


def register(sub) -> None:
    p = sub.add_parser("rebalance", help="rebalance imbalanced demonstrations (balanced BC group weights)")
    p.add_argument("--method", choices=("frequency", "dro", "metagrad"), default=None,
                   help="group weighting (default: the config's, else frequency)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--run", required=True, help="output name: the weights table goes to selections/<run>")
    p.add_argument("--groups", choices=("task", "source", "kmeans"), default=None,
                   help="groups from task or source labels, or discovered by k-means (default: task)")
    p.add_argument("--k", type=int, default=None, help="k-means: number of groups (default: best silhouette)")
    p.add_argument("--sources", nargs="+", default=None, help="step sources to rebalance (default: all)")
    p.add_argument("--embeddings", default=None, help="k-means on embeddings/<ENCODER> instead of state-action")
    p.add_argument("--config", default=None, help="YAML with RebalanceConfig options (dro: / metagrad: nest)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--trusted", nargs="+", default=None, metavar="GROUP",
                   help="metagrad: groups whose validation loss is the objective (default: all groups)")
    p.add_argument("--force", action="store_true", help="recompute even when the committed output matches")
    p.set_defaults(func=run)


def run(args) -> int:
    from distcur.config import load_config
    from distcur.rebalance.pipeline import RebalanceConfig, run_rebalance

    cfg = load_config(RebalanceConfig, args.config, method=args.method, groups=args.groups, k=args.k,
                      sources=args.sources, embeddings=args.embeddings, seed=args.seed,
                      trusted=args.trusted)
    manifest = run_rebalance(args.store, run=args.run, config=cfg, force=args.force)
    meta = manifest.metadata
    print(json.dumps({k: meta.get(k) for k in ("method", "grouping", "k", "groups", "group_counts", "alpha",
                                                "silhouette")} | {"rows": manifest.rows}, indent=2))
    return 0
