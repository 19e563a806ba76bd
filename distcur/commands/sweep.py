"""``distcur sweep``: Ray Tune over scorer, KDE bandwidth, top-x% and alpha (ASHA on the proxy)."""

from __future__ import annotations

from distcur.config import DEFAULT_STORE
from distcur.methods import names


def register(sub) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep of scorer / bandwidth / top-x%% / alpha; results at sweeps/<run>")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI with the prior, target and embeddings")
    p.add_argument("--target", default=None, help="target task (default pick-place-wall-v3)")
    p.add_argument("--run", default=None, help="sweep name (default sweep)")
    p.add_argument("--methods", nargs="+", default=None, choices=names("scorer"), metavar="METHOD",
                   help=f"scorers to sweep: {', '.join(names('scorer'))}")
    p.add_argument("--bandwidths", nargs="+", default=None,
                   help="IWR KDE bandwidths: scott, silverman, likelihood or a number")
    p.add_argument("--top", nargs="+", type=float, default=None, dest="top_percents", help="top-x%% values")
    p.add_argument("--alphas", nargs="+", type=float, default=None, help="co-training target probabilities")
    p.add_argument("--objective", choices=("proxy", "success"), default=None,
                   help="proxy: held-out target BC loss with ASHA early stopping; success: MetaWorld rollouts")
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--report-every", type=int, default=None)
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--config", default=None, help="YAML with any SweepConfig field")
    p.add_argument("--address", default=None, help="Ray address (default: local Ray or RAY_ADDRESS)")
    p.set_defaults(func=run)


def run(args) -> int:
    from distcur.config import load_config
    from distcur.distributed.sweep import SweepConfig, run_sweep

    fields = ("store", "target", "run", "methods", "bandwidths", "top_percents", "alphas", "objective",
              "train_steps", "report_every", "max_concurrent", "address")
    overrides = {f: getattr(args, f) for f in fields}
    cfg = load_config(SweepConfig, args.config, **overrides)
    table = run_sweep(cfg)
    metric = "proxy_loss" if cfg.objective == "proxy" else "success"
    rows = sorted(table.to_pylist(), key=lambda r: r[metric], reverse=cfg.objective == "success")
    print(f"{'method':<10}{'bw':>9}{'top%':>7}{'alpha':>7}{metric:>12}{'steps':>7}")
    for r in rows:
        print(f"{r['method']:<10}{str(r['bandwidth'] or '-'):>9}{r['top_percent']:>7g}{r['alpha']:>7g}"
              f"{r[metric]:>12.4f}{r['steps_trained']:>7d}")
    return 0
