"""``distcur evaluate``: MetaWorld success rate and proxy loss of a trained policy.

    distcur evaluate POLICY --task TASK [--store URI] [--episodes 50] [--seeds 0 1 2] [--method NAME]

``POLICY`` is a run name (``policies/<run>/policy.pt`` in ``--store``) or an explicit ``.pt`` key.
Rows go to the table ``evals/<out>/`` (default ``<out>`` = POLICY), one per seed: method, task,
seed, episodes, success (rate), proxy_loss, proxy_source, policy, and, when ``--method`` names a
committed selection, its selected_fraction and level. Evaluating another method into the same
``--out`` adds its rows; rerunning a (method, task, seed) replaces that row only. Name the method
after the selection the policy was trained on (``--method iwr`` for ``selections/iwr``) and
``distcur report`` puts its success next to that selection's make-up.

The proxy is the BC loss on held-out target demos: ``steps/source=target-<task>-heldout``, which
``distcur ingest metaworld`` writes (``--heldout-demos``). ``--proxy-source`` names another source
of demos not trained on; ``--in-sample-proxy`` scores the training target demos instead (recorded
as such, and said so). ``--episodes 0`` computes only the proxy (success is NaN). A task with no
simulator (not a MetaWorld v3 task, e.g. an OXE robot's) is evaluated by the proxy only as well: the
stage prints a ``PROXY-ONLY`` line, and its rows say ``evaluation: proxy-only`` (the report repeats
it). What the proxy measures and why it is held out: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging
import re

from distcur.config import DEFAULT_STORE

log = logging.getLogger(__name__)

EVAL_COLUMNS = ("method", "task", "seed", "episodes", "success", "proxy_loss", "proxy_source", "policy",
                "selected_fraction", "level", "evaluation")
PROXY_ONLY, ROLLOUTS = "proxy-only", "rollouts"


def simulator_for(task: str) -> str | None:
    """The simulator that can roll out ``task`` ("metaworld"), or None when there is none here."""
    try:
        import metaworld
    except ImportError:
        return None
    return "metaworld" if task in metaworld.MT1.ENV_NAMES else None


def proxy_only_reason(task: str, episodes: int) -> str | None:
    """Why an evaluation of ``task`` measures no success (None when it rolls out ``episodes``)."""
    # a mistyped MetaWorld name (...-v3) still goes to the rollouts, which name the valid tasks
    if simulator_for(task) is None and not re.fullmatch(r"[a-z0-9-]+-v[23]", task):
        return f"no simulator for task {task!r} (not a MetaWorld v3 task, or metaworld is not installed)"
    return "--episodes 0" if episodes == 0 else None


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
    p.add_argument("--out", default=None,
                   help="eval run name: rows added to evals/<out>/ (default: POLICY)")
    p.add_argument("--proxy-source", default=None,
                   help="step source for the proxy loss (default: target-<task>-heldout, see `ingest metaworld`)")
    p.add_argument("--in-sample-proxy", action="store_true",
                   help="score the proxy on target-<task>, the demos the policy was trained on (optimistic)")
    p.add_argument("--proxy-episodes", type=int, nargs="+", default=None, help="only these proxy episodes")
    p.add_argument("--envs-per-worker", type=int, default=10, help="environments stepped together per Ray task")
    p.add_argument("--no-ray", action="store_true", help="run the rollouts in this process")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    # Every stage takes --force, so a job's `common: {force: true}` and scripts work alike on all of them.
    p.add_argument("--force", action="store_true",
                   help="accepted like every stage's: evaluate never skips, it always reruns the rollouts and proxy")
    p.set_defaults(func=run)


def proxy_source_for(store, task: str, proxy_source: str | None = None, in_sample: bool = False) -> str | None:
    """The step source the proxy is scored on: ``proxy_source``, else the task's held-out demos
    (None, with a warning, when there are none), else with ``in_sample`` the training target demos."""
    from distcur.data import heldout_source, steps_key, target_source

    if proxy_source is not None and in_sample:
        raise ValueError(f"--proxy-source {proxy_source!r} and --in-sample-proxy: give one of them")
    if proxy_source is not None:
        if store.manifest(steps_key(proxy_source)) is None:
            raise FileNotFoundError(f"--proxy-source {proxy_source!r}: no step table at "
                                    f"{store.uri_of(steps_key(proxy_source))}")
        return proxy_source
    if in_sample:
        log.warning("proxy loss is IN-SAMPLE: scored on %s, the target demos the policy was trained on",
                    target_source(task))
        return target_source(task)
    source = heldout_source(task)
    if store.manifest(steps_key(source)) is None:
        log.warning("no held-out target demos at %s: proxy loss recorded as NaN (write them with `distcur ingest "
                    "metaworld --heldout-demos N`, or pass --proxy-source / --in-sample-proxy)",
                    store.uri_of(steps_key(source)))
        return None
    return source


def evaluate_policy(store, policy_ref: str, task: str, episodes: int, seeds, method: str | None = None,
                    proxy_source: str | None = None, proxy_episodes=None, envs_per_worker: int = 10,
                    parallel: bool = True, address: str | None = None, in_sample_proxy: bool = False) -> list[dict]:
    """One record per seed (see the module docstring), without writing anything."""
    from distcur.data import selection_key
    from distcur.evaluate.proxy import proxy_loss_on_source
    from distcur.policy.loaded import TrainedPolicy

    policy = TrainedPolicy.load(store, policy_ref)
    source = proxy_source_for(store, task, proxy_source, in_sample_proxy)
    proxy = proxy_loss_on_source(policy, store, source, proxy_episodes) if source else float("nan")
    reason = proxy_only_reason(task, episodes)
    if reason is not None:
        print(f"evaluate {policy_ref}: PROXY-ONLY evaluation, {reason}: success is not measured (NaN); the proxy "
              f"loss is the BC loss on {source or 'no demos (NaN)'}"
              f"{' (in-sample: the demos it trained on)' if in_sample_proxy else ''}", flush=True)
        episodes = 0
    if episodes > 0:
        from distcur import progress
        from distcur.envs.rollouts import evaluate_success

        executor = None
        if parallel:
            from distcur.distributed.metaworld import RayTasks

            executor = RayTasks(address, progress=progress.enabled(), label=f"rollouts {task}")
        rates = evaluate_success(policy, task, episodes=episodes, seeds=seeds, envs_per_worker=envs_per_worker,
                                 executor=executor)
    else:
        rates = [{"seed": int(s), "episodes": 0, "success": float("nan")} for s in seeds]
    method = method or policy_ref
    selection = store.manifest(selection_key(method))
    share = {"selected_fraction": selection.metadata.get("selected_fraction") if selection else None,
             "level": selection.config.get("level") if selection else None}
    return [{"method": method, "task": task, "seed": int(r["seed"]), "episodes": int(r["episodes"]),
             "success": float(r["success"]), "proxy_loss": float(proxy), "proxy_source": source or "",
             "policy": policy_ref, **share, "evaluation": PROXY_ONLY if reason else ROLLOUTS} for r in rates]


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the (method, task, seed) rows that ``new`` has, then ``new``."""
    replaced = {(r["method"], r["task"], int(r["seed"])) for r in new}
    return [r for r in old if (r["method"], r.get("task"), int(r["seed"])) not in replaced] + new


def run(args) -> int:
    import pyarrow as pa

    from distcur.data import eval_key
    from distcur.store import Store

    if args.episodes < 0:
        raise ValueError(f"--episodes must be >= 0, got {args.episodes}")
    store = Store(args.store)
    out = args.out or args.policy.replace("/", "_")
    key = eval_key(out)
    previous = store.manifest(key)
    # One config per method: the table holds every method evaluated into it.
    config = {**(previous.config.get("methods", {}) if previous else {})}
    config[args.method or args.policy] = {k: v for k, v in vars(args).items() if k not in ("func", "force")}
    writer = store.writer(key, "evaluate", {"methods": config})  # its clock times the whole stage
    records = evaluate_policy(store, args.policy, args.task, args.episodes, args.seeds, args.method,
                              args.proxy_source, args.proxy_episodes, args.envs_per_worker,
                              parallel=not args.no_ray, address=args.address, in_sample_proxy=args.in_sample_proxy)
    old = store.read_table(key).to_pylist() if previous is not None else []
    rows = merge_rows(old, [{c: r[c] for c in EVAL_COLUMNS} for r in records])
    columns = list(dict.fromkeys([*EVAL_COLUMNS, *(c for r in rows for c in r)]))
    try:
        writer.write(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]))
        writer.commit({"records": rows})
    except BaseException:
        writer.abort()
        raise
    log.info("evaluate: %d rows for %s (%d in all, %d methods) at %s", len(records), records[0]["method"], len(rows),
             len({r["method"] for r in rows}), store.uri_of(key))
    print(json.dumps({"results": store.uri_of(key), "records": records}, indent=2))
    return 0
