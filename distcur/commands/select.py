"""``distcur select``: a budget of prior steps (or the top x% of clusters, or those above a threshold) of a score run.

The flags are built from :class:`distcur.stages.select.SelectStageConfig` (the run names, the
nested :class:`distcur.select.SelectConfig` and the export options; ``--config`` YAML: any of its
fields, the flags win); the stage is :func:`distcur.stages.select.run`."""

from __future__ import annotations

import json

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE, add_config_flags, config_from_args
from distcur.select import SELECT_LEVELS, WEIGHTINGS

FLAGS = {"selection.budget_percent": "--budget", "selection.top_percent": "--top",
         "export.lerobot": "--export-lerobot", "export.sparse": "--export-sparse", "export.alpha": "--alpha",
         "export.hdf5_mask": "--export-hdf5-mask"}
HELPS = {
    "selection.budget_percent": "select this share (PERCENT) of the prior's steps, clusters in score order, the last "
                                "cut (default 10; at most one of --budget, --top, --threshold)",
    "selection.top_percent": "keep the top X percent of clusters, whatever their size",
    "selection.threshold": "keep clusters with mean score >= T",
    "selection.level": "cluster granularity (default step)",
    "selection.horizon": "sub-trajectory length H for --level subtraj",
    "selection.weighting": "selected steps' weight: 1, or their cluster's score (default uniform)",
    "selection.tie_seed": "seed of the permutation that breaks score ties",
}


def register(sub) -> None:
    from distcur.stages.select import SelectStageConfig

    p = sub.add_parser("select", help="scores -> selection (a share of prior steps, top x%% of clusters or a threshold; "
                                      "per step / sub-trajectory / episode)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    names = add_config_flags(p, SelectStageConfig, flags=FLAGS, helps=HELPS,
                             choices={"selection.level": SELECT_LEVELS, "selection.weighting": WEIGHTINGS})
    p.add_argument("--config", default=None, metavar="YAML",
                   help="SelectStageConfig options (scores, run, selection: {...}, export: {...}); the flags win")
    add_rerun_options(p)
    p.set_defaults(func=run, config_names=names)


def run(args) -> int:
    from distcur.stages import select

    config = config_from_args(select.SelectStageConfig, args, args.config_names, args.config)
    m = select.run(output_store(args.store, args), config)
    out = {"selection": f"selections/{config.run}", "rows": m.rows,
           "selected_fraction": m.metadata.get("selected_fraction")}
    if config.export.lerobot:
        out["lerobot"] = select.lerobot_key(config.run)
    if config.export.hdf5_mask:
        out["hdf5"] = select.hdf5_mask_dir(config.run)
    print(json.dumps(out, indent=2))
    return 0
