"""``distcur rebalance``: group weights for imbalanced demonstrations -> a weights table.

    distcur rebalance --method {frequency,dro,metagrad} --store URI --run NAME
                      [--groups task|source|kmeans] [--k K] [--sources S ...] [--embeddings ENCODER]
                      [--config YAML] [--seed N] [--force]

Writes ``selections/<run>`` (source, episode, step, weight) for ``distcur train --selection``
and prints the groups, their sizes and weights (and the chosen k for k-means) as JSON.
Every option of :class:`~distcur.stages.rebalance.RebalanceConfig` is a flag (``--dro-steps``,
``--metagrad-lr``, ... for the methods' nested ones) and a YAML key; the flags override the YAML;
a rerun with the same config and inputs is skipped.
"""

from __future__ import annotations

import json

from distcur.config import DEFAULT_STORE, add_config_flags, config_from_args


def register(sub) -> None:
    from distcur.stages.rebalance import RebalanceConfig

    p = sub.add_parser("rebalance", help="rebalance imbalanced demonstrations (balanced BC group weights)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--run", required=True, help="output name: the weights table goes to selections/<run>")
    p.add_argument("--config", default=None, help="YAML with RebalanceConfig options (dro: / metagrad: nest)")
    names = add_config_flags(p, RebalanceConfig)
    p.add_argument("--force", action="store_true", help="recompute even when the committed output matches")
    p.set_defaults(func=run, config_names=names)


def run(args) -> int:
    from distcur.stages import rebalance

    cfg = config_from_args(rebalance.RebalanceConfig, args, args.config_names, args.config)
    manifest = rebalance.run(args.store, cfg, args.run, force=args.force)
    meta = manifest.metadata
    print(json.dumps({k: meta.get(k) for k in ("method", "grouping", "k", "groups", "group_counts", "alpha",
                                                "silhouette")} | {"rows": manifest.rows}, indent=2))
    return 0
