"""``distcur evaluate``: MetaWorld success rate and proxy loss of a trained policy.

    distcur evaluate POLICY --task TASK [--store URI] [--episodes 50] [--seeds 0 1 2] [--method NAME]

``POLICY`` is a run name (``policies/<run>/policy.pt`` in ``--store``) or an explicit ``.pt`` key.
Results are committed as a table at ``evals/<out>/`` (default ``<out>`` = POLICY), one row per
seed: method, task, seed, episodes, success (rate), proxy_loss, proxy_source, policy.

The proxy is the BC loss on ``--proxy-source`` (default: the task's target source
``target-<task>``; pass a source of demos not used in training for a held-out proxy).
``--episodes 0`` computes only the proxy (success is NaN).
"""

from __future__ import annotations

import json

from distcur.config import DEFAULT_STORE

EVAL_COLUMNS = ("method", "task", "seed", "episodes", "success", "proxy_loss", "proxy_source", "policy")


def register(sub) -> None:
    import argparse

    p = sub.add_parser("evaluate", help="success rate (MetaWorld rollouts) and proxy loss of a policy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policy", help="policy run name (policies/<run>/policy.pt) or a .pt key in the store")
    p.add_argument("--task", required=True, help="MetaWorld v3 task, e.g. pick-place-wall-v3")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--episodes", type=int, default=50, help="rollouts per seed (0: proxy loss only)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluation seeds")
    p.add_argument("--method", default=None, help="method label in the results (default: the policy name)")
    p.add_argument("--out", default=None, help="eval run name: results at evals/<out>/ (default: POLICY)")
    p.add_argument("--proxy-source", default=None, help="step source for the proxy loss (default target-<task>)")
    p.add_argument("--proxy-episodes", type=int, nargs="+", default=None, help="only these proxy episodes")
    p.add_argument("--envs-per-worker", type=int, default=10, help="environments stepped together per Ray task")
    p.add_argument("--no-ray", action="store_true", help="run the rollouts in this process")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def evaluate_policy(store, policy_ref: str, task: str, episodes: int, seeds, method: str | None = None,
                    proxy_source: str | None = None, proxy_episodes=None, envs_per_worker: int = 10,
                    parallel: bool = True, address: str | None = None) -> list[dict]:
    """One record per seed (see the module docstring), without writing anything."""
    from distcur.data import steps_key, target_source
    from distcur.evaluate.proxy import proxy_loss_on_source
    from distcur.policy.loaded import TrainedPolicy

    policy = TrainedPolicy.load(store, policy_ref)
    source = proxy_source or target_source(task)
    if store.manifest(steps_key(source)) is not None:
        proxy = proxy_loss_on_source(policy, store, source, proxy_episodes)
    elif proxy_source is not None:
        raise FileNotFoundError(f"--proxy-source {proxy_source!r}: no step table at {store.uri_of(steps_key(source))}")
    else:
        proxy, source = float("nan"), ""  # recorded as missing, not silently invented
    if episodes > 0:
        from distcur.evaluate.metaworld import evaluate_success

        rates = evaluate_success(policy, task, episodes=episodes, seeds=seeds, envs_per_worker=envs_per_worker,
                                 parallel=parallel, address=address)
    else:
        rates = [{"seed": int(s), "episodes": 0, "success": float("nan")} for s in seeds]
    return [{"method": method or policy_ref, "task": task, "seed": int(r["seed"]), "episodes": int(r["episodes"]),
             "success": float(r["success"]), "proxy_loss": float(proxy), "proxy_source": source, "policy": policy_ref}
            for r in rates]


def run(args) -> int:
    import pyarrow as pa

    from distcur.data import eval_key
    from distcur.store import Store

    if args.episodes < 0:
        raise ValueError(f"--episodes must be >= 0, got {args.episodes}")
    store = Store(args.store)
    records = evaluate_policy(store, args.policy, args.task, args.episodes, args.seeds, args.method,
                              args.proxy_source, args.proxy_episodes, args.envs_per_worker,
                              parallel=not args.no_ray, address=args.address)
    table = pa.table({c: [r[c] for r in records] for c in EVAL_COLUMNS})
    out = args.out or args.policy.replace("/", "_")
    config = {k: v for k, v in vars(args).items() if k != "func"}
    store.write_table(eval_key(out), table, stage="evaluate", config=config, metadata={"records": records})
    print(json.dumps({"results": store.uri_of(eval_key(out)), "records": records}, indent=2))
    return 0
