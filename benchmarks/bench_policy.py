"""Policy training and evaluation figures on MetaWorld -> benchmarks/results/policy.json.

    python benchmarks/bench_policy.py [--task pick-place-wall-v3] [--episodes 50] [--seeds 0 1 2]

1. expert50: a policy trained on 50 expert demos of the task (target-only); must reach >= 0.8.
2. target_only: trained on the default 5 target demos only; all_data: co-trained (alpha 0.5)
   on the 5 demos plus every prior step (weight 1). Both through the same selection path as
   every method (baseline_selection -> load_training_data -> train_to_store).
3. train_steps_per_s: optimiser steps per second of the one-process loop (3 x 400, batch 256);
   rollout_steps_per_s: environment steps per second of batched rollouts of a trained policy.

Success is reported per evaluation seed (``--seeds``, ``--episodes`` each) with mean and
standard error; each method trains one policy per ``--train-seeds`` entry (default one, seed 0),
and the evaluation seeds are the rollout seeds of that policy.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np
import torch

from distcur.data import target_source
from distcur.distributed.tasks import RayTasks
from distcur.envs.generation import MetaWorldPriorConfig
from distcur.envs.rollouts import evaluate_success, rollout_steps_per_s
from distcur.policy.loaded import TrainedPolicy
from distcur.policy.train import TrainConfig
from distcur.sources.common import map_sequential
from distcur.stages.evaluate import proxy_loss_on_source
from distcur.stages.ingest import MetaWorldIngestConfig, run_metaworld
from distcur.stages.train import baseline_selection, load_policy, load_training_data, train_to_store
from distcur.store import Store

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_facts  # noqa: E402


def train_method(store: Store, task: str, kind: str, cfg: TrainConfig, run: str) -> tuple[TrainedPolicy, dict]:
    selection = None if kind == "target_only" else baseline_selection(store, kind)
    data = load_training_data(store, target_source(task), selection, allow_empty_selection=selection is None)
    t0 = time.perf_counter()
    manifest = train_to_store(store, run, data, cfg, resume=False)
    wall = time.perf_counter() - t0
    info = {"run": run, "n_target": data.n_target, "n_prior": data.n_prior, "train_wall_s": round(wall, 2),
            "manifest_wall_s": manifest.wall_s, "final_loss": manifest.metadata.get("history", [{}])[-1].get("loss")}
    return load_policy(store, run), info


def generate_metaworld(cfg: MetaWorldPriorConfig, store: Store, executor) -> dict:
    return run_metaworld(store, MetaWorldIngestConfig(prior=cfg, heldout_demos=0), executor, progress=False)


def evaluate(policy, task, episodes, seeds, executor) -> dict:
    records = evaluate_success(policy, task, episodes=episodes, seeds=seeds, executor=executor)
    rates = np.array([r["success"] for r in records])
    sem = float(rates.std(ddof=1) / np.sqrt(len(rates))) if len(rates) > 1 else 0.0
    return {"success": float(rates.mean()), "sem": sem, "per_seed": records}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="pick-place-wall-v3")
    p.add_argument("--store", default=os.environ.get("DISTCUR_BENCH_STORE", "/tmp/distcur-bench-policy"))
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", default=["expert50", "target_only", "all_data"])
    p.add_argument("--ray", action="store_true", help="generation and rollouts as Ray tasks (default: in process)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "policy.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parallel = RayTasks(progress=False) if args.ray else None  # the rollouts' executor (None: in process)
    runner = RayTasks(progress=False) if args.ray else functools.partial(map_sequential, progress=False)
    cfg_kwargs = dict(steps=args.steps, checkpoint_every=args.steps)
    results: dict = {}
    details: dict = {}
    t_start = time.time()

    if "expert50" in args.only:
        store50 = Store(os.path.join(args.store, "expert50"))
        gen = generate_metaworld(MetaWorldPriorConfig(target=args.task, tasks=(args.task,), success_per_task=0,
                                                      failed_per_task=1, target_demos=50), store50, runner)
        details["expert50_generation"] = {k: gen[k] for k in ("target", "wall_s")}
        per = []
        for ts in args.train_seeds:
            policy, info = train_method(store50, args.task, "target_only", TrainConfig(**cfg_kwargs, seed=ts), f"expert50-s{ts}")
            ev = evaluate(policy, args.task, args.episodes, args.seeds, parallel)
            per.append({**info, **ev, "train_seed": ts})
            results.setdefault("train_steps_per_s", round(args.steps / info["train_wall_s"], 2))
            if "rollout_steps_per_s" not in results:
                rs = rollout_steps_per_s(policy, args.task, episodes=20, executor=parallel)
                results["rollout_steps_per_s"] = rs["steps_per_s"]
                details["rollout"] = rs
        results["expert50_success"] = float(np.mean([r["success"] for r in per]))
        details["expert50"] = per
        write(args, results, details, t_start)

    store = Store(os.path.join(args.store, "default"))
    if {"target_only", "all_data"} & set(args.only):
        gen = generate_metaworld(MetaWorldPriorConfig(target=args.task), store, runner)
        details["default_generation"] = {k: gen[k] for k in ("prior", "target", "wall_s")}
    for method, kind in (("target_only", "target_only"), ("all_data", "all")):
        if method not in args.only:
            continue
        per = []
        for ts in args.train_seeds:
            policy, info = train_method(store, args.task, kind, TrainConfig(**cfg_kwargs, seed=ts), f"{method}-s{ts}")
            ev = evaluate(policy, args.task, args.episodes, args.seeds, parallel)
            proxy = proxy_loss_on_source(policy, store, target_source(args.task))
            per.append({**info, **ev, "proxy_loss_on_target_demos": proxy, "train_seed": ts})
        results[f"{method}_success"] = float(np.mean([r["success"] for r in per]))
        results[f"{method}_sem"] = float(np.mean([r["sem"] for r in per]))
        details[method] = per
        write(args, results, details, t_start)

    write(args, results, details, t_start)
    print(json.dumps(results, indent=2))
    return 0


def write(args, results: dict, details: dict, t_start: float) -> None:
    """Write the results so far (called after each method, so a cut-short run leaves its figures)."""
    out = {
        **results,
        "protocol": {"task": args.task, "episodes_per_seed": args.episodes, "eval_seeds": args.seeds,
                     "train_seeds": args.train_seeds, "steps": args.steps, "batch_size": 256,
                     "hidden": [400, 400, 400], "alpha_all_data": 0.5, "weighting": "sample"},
        "details": details,
        "machine": {**machine_facts(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_avg_at_end": os.getloadavg()},
        "wall_s": round(time.time() - t_start, 1),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
    sys.exit(main())
