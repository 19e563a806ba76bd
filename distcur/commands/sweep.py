"""``distcur sweep``: Ray Tune over scorer, KDE bandwidth, top-x% and alpha (ASHA on the proxy).

The flags are built from :class:`distcur.stages.sweep.SweepConfig`, its training options
(``train: TrainConfig``) included (``--lr``, ``--hidden``, ...); ``--config`` YAML: any of its
fields, the flags winning."""

from __future__ import annotations

from distcur.config import add_config_flags, config_from_args
from distcur.stages.sweep import PER_TRIAL, SweepConfig

FLAGS = {"top_percents": "--top", "train.steps": "--train-steps"}
HELPS = {"train.steps": "training steps of each trial"}


def register(sub) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep of scorer / bandwidth / top-x%% / alpha; results at sweeps/<run>")
    names = add_config_flags(p, SweepConfig, flags=FLAGS, helps=HELPS,
                             skip=tuple(f"train.{n}" for n in PER_TRIAL))
    p.add_argument("--config", default=None, help="YAML with any SweepConfig field")
    p.set_defaults(func=run, config_names=names)


def run(args) -> int:
    from distcur.stages import sweep

    cfg = config_from_args(SweepConfig, args, args.config_names, args.config)
    table = sweep.run(cfg)
    metric = "proxy_loss" if cfg.objective == "proxy" else "success"
    rows = sorted(table.to_pylist(), key=lambda r: r[metric], reverse=cfg.objective == "success")
    print(f"{'method':<10}{'bw':>9}{'top%':>7}{'alpha':>7}{metric:>12}{'steps':>7}")
    for r in rows:
        print(f"{r['method']:<10}{str(r['bandwidth'] or '-'):>9}{r['top_percent']:>7g}{r['alpha']:>7g}"
              f"{r[metric]:>12.4f}{r['steps_trained']:>7d}")
    return 0
