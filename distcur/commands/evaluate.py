"""``distcur evaluate``: the command line of :mod:`distcur.stages.evaluate` (its docstring says
what it measures and writes).

    distcur evaluate POLICY --task TASK [--store URI] [--episodes 50] [--seeds 0 1 2] [--method NAME]

Every option of :class:`~distcur.stages.evaluate.EvaluateConfig` is a flag and a key of the
``--config`` YAML (the flags win).
"""

from __future__ import annotations

import json

from distcur.config import DEFAULT_STORE, add_config_flags, config_from_args


def register(sub) -> None:
    import argparse

    from distcur.stages.evaluate import EvaluateConfig

    p = sub.add_parser("evaluate", help="success rate (MetaWorld rollouts) and proxy loss of a policy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policy", help="policy run name (policies/<run>/policy.pt) or a .pt key in the store")
    p.add_argument("--task", required=True, help="MetaWorld v3 task, e.g. pick-place-wall-v3")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--config", default=None, help="YAML with EvaluateConfig options")
    names = add_config_flags(p, EvaluateConfig)
    # Every stage takes --force, so a job's `common: {force: true}` and scripts work alike on all of them.
    p.add_argument("--force", action="store_true",
                   help="accepted like every stage's: evaluate never skips, it always reruns the rollouts and proxy")
    p.set_defaults(func=run, config_names=names)


def run(args) -> int:
    from distcur.stages import evaluate
    from distcur.store import Store

    cfg = config_from_args(evaluate.EvaluateConfig, args, args.config_names, args.config)
    key, records = evaluate.run(args.store, cfg, args.policy, args.task)
    print(json.dumps({"results": Store(args.store).uri_of(key), "records": records}, indent=2))
    return 0
