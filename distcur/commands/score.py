"""``distcur score``: score every prior step for a target task (sr, ar, br, strap, iwr, random)."""

from __future__ import annotations

import json

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE

METHODS = ("sr", "ar", "br", "strap", "iwr", "random")


def register(sub) -> None:
    p = sub.add_parser("score", help="score every prior step against the target demos of a task")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--target", required=True, help="target task name (its demos are source target-<task>)")
    p.add_argument("--run", required=True, help="output run name: writes scores/<run>")
    p.add_argument("--prior-sources", nargs="+", default=None, help="prior sources (default: all non-target)")
    p.add_argument("--encoder", default=None, help="embedding used by br / strap / iwr (default: vae)")
    p.add_argument("--block", type=int, default=None, help="sr/ar/br: rows per distance block (default 1024)")
    p.add_argument("--k", type=int, default=None, help="strap: matched sub-trajectories kept (default 100)")
    p.add_argument("--threshold", type=float, default=None, help="strap: end-effector speed cut (default 5e-3)")
    p.add_argument("--min-length", type=int, default=None, help="strap: minimum segment length (default 20)")
    p.add_argument("--seed", type=int, default=None, help="random: seed (default 0)")
    p.add_argument("--bandwidth", default=None, help="iwr: scott (default), silverman, likelihood (max held-out likelihood), or a number")
    p.add_argument("--mode", default=None, choices=("exact", "subsample"), help="iwr: KDE mode (default exact)")
    p.add_argument("--iwr-kernel", default=None, choices=("shared-prior", "per-set"),
                   help="iwr: kernel shapes, the prior's covariance for both KDEs (shared-prior, default) "
                        "or each set's own (per-set, as two scipy gaussian_kde)")
    p.add_argument("--num-shards", type=int, default=None, help="iwr: prior shards for the KDE partial sums")
    p.add_argument("--subsample", type=int, default=None, help="iwr: reference subsample size in subsample mode")
    p.add_argument("--kde-executor", default=None, choices=("tasks", "ray-data"),
                   help="iwr: how the KDE partial sums run on Ray, a grid of Ray tasks (tasks, default) or a "
                        "Ray Data dataset of query blocks (ray-data); the same scores either way")
    add_rerun_options(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


# which CLI options each method accepts; any other option given is an error, never silently ignored
_OPTIONS = {
    "sr": ("block",), "ar": ("block",), "br": ("block", "encoder"),
    "strap": ("encoder", "k", "threshold", "min_length"),
    "random": ("seed",),
    "iwr": ("encoder", "bandwidth", "iwr_kernel", "mode", "num_shards", "subsample", "kde_executor"),
}
_ALL = sorted({o for opts in _OPTIONS.values() for o in opts})


def run(args) -> int:
    from distcur.distributed.score import score

    given = {name: getattr(args, name) for name in _ALL if getattr(args, name) is not None}
    unused = sorted(set(given) - set(_OPTIONS[args.method]))
    if unused:
        raise ValueError(f"option(s) {['--' + u.replace('_', '-') for u in unused]} do not apply to --method {args.method}")
    if "bandwidth" in given:
        try:
            given["bandwidth"] = float(given["bandwidth"])
        except ValueError:
            pass
    if "iwr_kernel" in given:
        given["kernel"] = given.pop("iwr_kernel")
    if "kde_executor" in given:
        given["executor"] = given.pop("kde_executor")
    opts = {**given, "prior_sources": args.prior_sources, "address": args.address}
    m = score(output_store(args.store, args), args.method, args.target, args.run, **opts)
    print(json.dumps({"scores": f"scores/{args.run}", "rows": m.rows, "method": args.method,
                      "target": args.target}, indent=2))
    return 0
