"""``distcur select``: a budget of prior steps (or the top x% of clusters, or those above a threshold) of a score run.

The selection flags are built from :class:`distcur.select.SelectConfig` (``--config`` YAML: any of
its fields; the flags win); the run names and exports are the stage's own arguments
(:func:`distcur.stages.select.run`)."""

from __future__ import annotations

import json

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE, add_config_flags, config_from_args
from distcur.select import SELECT_LEVELS, WEIGHTINGS, SelectConfig

FLAGS = {"budget_percent": "--budget", "top_percent": "--top"}
HELPS = {
    "budget_percent": "select this share (PERCENT) of the prior's steps, clusters in score order, the last cut "
                      "(default 10; at most one of --budget, --top, --threshold)",
    "top_percent": "keep the top X percent of clusters, whatever their size",
    "threshold": "keep clusters with mean score >= T",
    "level": "cluster granularity (default step)",
    "horizon": "sub-trajectory length H for --level subtraj",
    "weighting": "selected steps' weight: 1, or their cluster's score (default uniform)",
    "tie_seed": "seed of the permutation that breaks score ties",
}


def register(sub) -> None:
    p = sub.add_parser("select", help="scores -> selection (a share of prior steps, top x%% of clusters or a threshold; "
                                      "per step / sub-trajectory / episode)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--scores", required=True, help="score run to select from (scores/<run>)")
    p.add_argument("--run", required=True, help="output run name: writes selections/<run>")
    names = add_config_flags(p, SelectConfig, flags=FLAGS, helps=HELPS,
                             choices={"level": SELECT_LEVELS, "weighting": WEIGHTINGS})
    p.add_argument("--config", default=None, metavar="YAML", help="SelectConfig options; the flags above win over it")
    add_rerun_options(p)
    p.add_argument("--export-lerobot", action="store_true",
                   help="also write selections/<run>/lerobot: (index, weight); for LeRobot-ingested sources the "
                        "dataset's own index with episode_index and frame_index, every frame (weight 0 unselected)")
    p.add_argument("--export-sparse", action="store_true",
                   help="LeRobot export of the selected frames only (the manifest states the others' weight, 0)")
    p.add_argument("--alpha", type=float, default=None,
                   help="target share of a co-training batch, recorded with the LeRobot export (default 0.5)")
    p.add_argument("--export-hdf5-mask", default=None, metavar="KEY",
                   help="for HDF5-ingested sources: copies of the files under selections/<run>/hdf5/ with "
                        "mask/KEY = the selected demos (the originals are never written)")
    p.set_defaults(func=run, config_names=names)


def run(args) -> int:
    from distcur.stages import select

    config = config_from_args(SelectConfig, args, args.config_names, args.config)
    m = select.run(output_store(args.store, args), args.scores, args.run, config, export_lerobot=args.export_lerobot,
                   dense=not args.export_sparse, alpha=args.alpha, export_hdf5_mask=args.export_hdf5_mask)
    out = {"selection": f"selections/{args.run}", "rows": m.rows,
           "selected_fraction": m.metadata.get("selected_fraction")}
    if args.export_lerobot:
        out["lerobot"] = select.lerobot_key(args.run)
    if args.export_hdf5_mask:
        out["hdf5"] = select.hdf5_mask_dir(args.run)
    print(json.dumps(out, indent=2))
    return 0
