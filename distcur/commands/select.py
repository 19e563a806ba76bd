"""``distcur select``: a budget of prior steps (or the top x% of clusters, or those above a threshold) of a score run."""

from __future__ import annotations

import json

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE


def register(sub) -> None:
    p = sub.add_parser("select", help="scores -> selection (a share of prior steps, top x%% of clusters or a threshold; "
                                      "per step / sub-trajectory / episode)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--scores", required=True, help="score run to select from (scores/<run>)")
    p.add_argument("--run", required=True, help="output run name: writes selections/<run>")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--budget", type=float, default=None, metavar="PERCENT",
                      help="select this share of the prior's steps, clusters in score order, the last cut (default 10)")
    rule.add_argument("--top", type=float, default=None, help="keep the top X percent of clusters, whatever their size")
    rule.add_argument("--threshold", type=float, default=None, help="keep clusters with mean score >= T")
    p.add_argument("--level", default="step", choices=("step", "subtraj", "episode"),
                   help="cluster granularity (default: step)")
    p.add_argument("--tie-seed", type=int, default=0, help="seed of the permutation that breaks score ties")
    p.add_argument("--horizon", type=int, default=30, help="sub-trajectory length H for --level subtraj")
    p.add_argument("--weighting", default="uniform", choices=("uniform", "score"))
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
    p.set_defaults(func=run)


def run(args) -> int:
    from distcur.select import SelectConfig, lerobot_key, run_select

    config = SelectConfig(budget_percent=args.budget, top_percent=args.top, threshold=args.threshold, level=args.level,
                          horizon=args.horizon, weighting=args.weighting, tie_seed=args.tie_seed)
    m = run_select(output_store(args.store, args), args.scores, args.run, config, export_lerobot=args.export_lerobot,
                   dense=not args.export_sparse, alpha=args.alpha, export_hdf5_mask=args.export_hdf5_mask)
    out = {"selection": f"selections/{args.run}", "rows": m.rows,
           "selected_fraction": m.metadata.get("selected_fraction")}
    if args.export_lerobot:
        out["lerobot"] = lerobot_key(args.run)
    if args.export_hdf5_mask:
        from distcur.select import hdf5_mask_dir

        out["hdf5"] = hdf5_mask_dir(args.run)
    print(json.dumps(out, indent=2))
    return 0
