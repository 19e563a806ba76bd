"""Balanced BC on imbalanced demonstrations: uniform BC against each rebalancing (issue #6).

Two parts, each a subcommand:

``toy``: the 2-D set of :mod:`distcur.rebalance.toy2d` (frequent behaviour 10x the rare one,
overlapping states). For each method the group weights are computed, a fresh policy is
trained on the weights (the trainer's weighted sampling) and its action error on each
behaviour's own states is measured. Scenarios: groups = the behaviour labels, and groups =
k-means with k = 4 on state-action pairs (over-segmentation: the frequent behaviour spans
several clusters, so equal weight per *group* is no longer equal weight per behaviour), and
``corrupt``: a third group of mislabelled pairs (rare states, frequent actions) as large as the
rare group, with the meta-gradient judging weights by the trusted groups' validation loss.
Writes ``benchmarks/results/rebalance_toy2d.json``.

``metaworld``: a multi-task MetaWorld set where one task has ~10x the successful demos of the
others, the task one-hot appended to the state; policies trained through
:func:`distcur.policy.train.train_policy` on uniform weights and on each rebalancing's weights
table (groups = task), evaluated by per-task success. Merges records ``"task":
"imbalanced/<task>"`` (per task, method, seed) and ``"imbalanced/average"`` into
``benchmarks/results/quality_metaworld.json`` (other records are left untouched).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cores": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "load_avg": os.getloadavg()}


# -- toy ---------------------------------------------------------------------------------------
def run_toy(args) -> dict:
    from distcur.policy.functional import PolicySpec
    from distcur.policy.train import train_weighted_bc
    from distcur.rebalance.dro import DROConfig, dro_rebalance
    from distcur.rebalance.frequency import frequency_alpha
    from distcur.rebalance.group import alpha_to_sample_weights, groups_from_labels, kmeans_groups
    from distcur.rebalance.metagrad import MetaGradConfig, metagrad_rebalance
    from distcur.rebalance.toy2d import action_errors, make_toy2d

    torch.set_num_threads(1)
    spec = PolicySpec(2, 2, tuple(args.hidden))
    steps, batch, lr = args.steps, 128, 3e-3
    records = []
    for scenario in args.scenarios:
        for seed in args.seeds:
            # "corrupt": as many mislabelled pairs as rare ones (rare states, frequent actions); the
            # meta-gradient's objective is the trusted groups' (frequent, rare) validation loss.
            data = make_toy2d(n_frequent=1000, ratio=10.0, seed=seed, n_corrupt=100 if scenario == "corrupt" else 0)
            objective_groups = None
            if scenario in ("labels", "corrupt"):
                groups = groups_from_labels(data.behaviour)
                if scenario == "corrupt":
                    objective_groups = tuple(groups.names.index(b) for b in ("frequent", "rare"))
            else:
                groups = kmeans_groups(np.concatenate([data.state, data.action], 1), k=4, seed=seed)
            rare = data.behaviour == "rare"
            methods: dict[str, tuple[np.ndarray | None, float]] = {"uniform": (None, 0.0)}
            t = time.time()
            methods["frequency"] = (frequency_alpha(groups.group, groups.k), time.time() - t)
            t = time.time()
            dro = dro_rebalance(data.state, data.action, groups.group, groups.k, spec,
                                DROConfig(steps=steps, reference_steps=steps, batch_size=batch, lr=lr), seed=seed)
            methods["dro"] = (dro.alpha, time.time() - t)
            for init in ("uniform", "data"):
                t = time.time()
                mg = metagrad_rebalance(data.state, data.action, groups.group, groups.k, spec,
                                        MetaGradConfig(init=init, outer_steps=8, inner_steps=10, warmup_steps=200,
                                                       lr=lr, meta_lr=1.0, objective_groups=objective_groups),
                                        seed=seed, episode=data.episode)
                methods[f"metagrad-{init}"] = (mg.alpha, time.time() - t)
            for name, (alpha, secs) in methods.items():
                w = None if alpha is None else alpha_to_sample_weights(groups.group, alpha)
                params = train_weighted_bc(data.state, data.action, w, spec, steps, batch, lr, seed=seed)
                err = action_errors(params, spec)
                rare_share = float(rare.mean()) if w is None else float(w[rare].sum() / w.sum())
                records.append({"scenario": scenario, "seed": seed, "method": name, "k": groups.k,
                                "alpha": None if alpha is None else np.round(alpha, 4).tolist(),
                                "rare_share": round(rare_share, 4), "err_frequent": round(err["frequent"], 4),
                                "err_rare": round(err["rare"], 4),
                                "err_balanced": round((err["frequent"] + err["rare"]) / 2, 4),
                                "weights_s": round(secs, 2)})
                print(json.dumps(records[-1]), flush=True)
    summary = {}
    for scenario in args.scenarios:
        for name in ("uniform", "frequency", "dro", "metagrad-uniform", "metagrad-data"):
            rs = [r for r in records if r["scenario"] == scenario and r["method"] == name]
            summary[f"{scenario}/{name}"] = {
                key: {"median": float(np.median([r[key] for r in rs])), "min": float(min(r[key] for r in rs)),
                      "max": float(max(r[key] for r in rs))}
                for key in ("err_rare", "err_frequent", "err_balanced", "rare_share")
            }
    out = {"protocol": {"data": "toy2d n_frequent=1000 ratio=10; corrupt: + 100 mislabelled pairs (rare states, "
                                "frequent actions), metagrad objective = frequent + rare validation loss", "policy_hidden": list(args.hidden),
                        "train_steps": steps, "batch_size": batch, "lr": lr, "seeds": list(args.seeds),
                        "dro": "eta=0.2 s=0.05, reference balanced", "metagrad": "8 rounds x K=10 steps, warmup 200",
                        "metric": "mean L2 action error on fresh states of each behaviour"},
           "machine": machine(), "summary": summary, "records": records}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rebalance_toy2d.json").write_text(json.dumps(out, indent=2))
    return out


# -- MetaWorld ---------------------------------------------------------------------------------
def merge_quality_records(path: Path, records: list[dict], protocol: dict) -> None:
    """Replace only the ``imbalanced/*`` records (and the protocol's ``imbalanced`` entry)."""
    from distcur.stages.quality import merge_quality_json

    merge_quality_json(path, {"protocol": {"imbalanced": protocol}, "results": records},
                       drop_task_prefix="imbalanced/")


def run_metaworld(args) -> dict:
    from distcur.data import load_steps
    from distcur.distributed.tasks import RayTasks
    from distcur.envs.generation import MetaWorldPriorConfig
    from distcur.envs.rollouts import evaluate_success
    from distcur.policy.loaded import TrainedPolicy
    from distcur.policy.train import TrainConfig, TrainingData, train_policy
    from distcur.rebalance.dro import DROConfig
    from distcur.rebalance.metagrad import MetaGradConfig
    from distcur.sources.common import map_sequential
    from distcur.stages import rebalance
    from distcur.stages.ingest import MetaWorldIngestConfig, run_metaworld
    from distcur.stages.rebalance import RebalanceConfig
    from distcur.stages.train import read_selection
    from distcur.store import Store

    t_start = time.time()
    torch.set_num_threads(args.threads)  # on a shared, oversubscribed machine one thread is faster
    tasks = list(args.tasks)
    frequent = args.frequent or tasks[0]
    counts = {t: (args.frequent_demos if t == frequent else args.rare_demos) for t in tasks}
    store = Store(args.store)
    # The generator is target-centric: an extra task serves as the (unused) target, with no
    # prior episodes; failed episodes are off, so the prior is the imbalanced expert set alone.
    gen_cfg = MetaWorldPriorConfig(target=args.unused_target, tasks=tuple(tasks), task_counts=counts,
                                   success_per_task=0, failed_per_task=0, target_demos=1,
                                   append_task_onehot=True, seed=args.data_seed)
    t = time.time()
    local = functools.partial(map_sequential, progress=False)
    run_metaworld(store, MetaWorldIngestConfig(prior=gen_cfg, heldout_demos=0), executor=local if args.no_ray else None,
                  progress=False)
    gen_s = time.time() - t
    onehot_over = list(gen_cfg.tasks)
    steps = load_steps(store, ["metaworld"])
    print(f"generated {len(steps)} steps in {gen_s:.0f}s; per task:",
          {t: int((steps.task == t).sum()) for t in tasks}, flush=True)

    small = RebalanceConfig(groups="task", sources=["metaworld"], hidden=tuple(args.rebalance_hidden),
                            dro=DROConfig(steps=args.dro_steps, reference_steps=args.dro_steps),
                            metagrad=MetaGradConfig(outer_steps=args.meta_rounds, inner_steps=args.meta_k,
                                                    warmup_steps=args.meta_warmup))
    weights: dict[str, np.ndarray] = {"uniform": np.ones(len(steps))}
    alphas: dict[str, list[float]] = {}
    weights_s: dict[str, float] = {}
    for method in args.methods:
        if method == "uniform":
            continue
        t = time.time()
        m = rebalance.run(store, dataclasses.replace(small, method=method), f"imbalanced-{method}")
        weights_s[method] = round(time.time() - t, 1)
        sel = read_selection(store, f"imbalanced-{method}")
        assert np.array_equal(sel.column("episode").to_numpy(), steps.episode)
        assert np.array_equal(sel.column("step").to_numpy(), steps.step)
        weights[method] = sel.column("weight").to_numpy().astype(np.float64)
        alphas[method] = dict(zip(m.metadata["groups"], m.metadata["alpha"]))
        print(method, "alpha", alphas[method], f"{weights_s[method]}s", flush=True)
    if args.prepare_only:
        return {"alpha": alphas, "weights_s": weights_s}

    def protocol_of(per_method_avg: dict) -> dict:
        summary = {m: {"mean": float(np.mean(v)), "se": float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None,
                       "per_seed": v} for m, v in per_method_avg.items()}
        best = max((m for m in summary if m != "uniform"), key=lambda m: summary[m]["mean"], default=None)
        if best is not None and "uniform" in summary and summary["uniform"]["mean"] > 0:
            summary["best_over_uniform"] = {"method": best, "ratio": summary[best]["mean"] / summary["uniform"]["mean"]}
        protocol = {"tasks": tasks, "frequent_task": frequent, "demos_per_task": counts, "task_onehot": True,
                    "groups": "task", "policy_hidden": list(args.hidden), "train_steps": args.train_steps,
                    "batch_size": args.batch_size, "episodes_per_task_per_seed": args.episodes, "seeds": list(args.seeds),
                    "eval_max_steps": args.eval_max_steps,
                    "methods": list(args.methods), "alpha": alphas, "weights_s": weights_s,
                    "dro": {"eta": 0.2, "s": 0.05, "steps": args.dro_steps},
                    "metagrad": {"rounds": args.meta_rounds, "K": args.meta_k, "warmup": args.meta_warmup},
                    "summary": summary, "generation_s": round(gen_s, 1), "total_s": round(time.time() - t_start, 1),
                    "machine": machine()}
        return protocol

    records = []
    per_method_avg = {}
    for seed in args.seeds:
        for method in args.methods:
            cfg = TrainConfig(hidden=tuple(args.hidden), steps=args.train_steps, batch_size=args.batch_size,
                              alpha=0.0, seed=seed, checkpoint_every=0, log_every=max(1, args.train_steps // 10))
            data = TrainingData(obs=steps.state, act=steps.action, n_target=0, prior_weight=weights[method])
            t = time.time()
            params, normalizer, _ = train_policy(data, cfg)
            train_s = time.time() - t
            policy = TrainedPolicy(params=params, spec=_spec(params, steps, cfg), normalizer=normalizer)
            successes = []
            for task in tasks:
                t = time.time()
                res = evaluate_success(policy, task, episodes=args.episodes, seeds=(seed,),
                                       max_steps=args.eval_max_steps, append_task_onehot_over=onehot_over,
                                       executor=None if args.no_ray else RayTasks(progress=False))
                successes.append(res[0]["success"])
                records.append({"task": f"imbalanced/{task}", "method": method, "seed": seed,
                                "episodes": res[0]["episodes"], "success": res[0]["success"], "proxy_loss": None,
                                "selected_fraction": 1.0, "demos": counts[task],
                                "frequent": task == frequent, "train_s": round(train_s, 1),
                                "eval_s": round(time.time() - t, 1)})
                print(json.dumps(records[-1]), flush=True)
            records.append({"task": "imbalanced/average", "method": method, "seed": seed,
                            "episodes": args.episodes, "success": float(np.mean(successes)), "proxy_loss": None,
                            "selected_fraction": 1.0})
            per_method_avg.setdefault(method, []).append(float(np.mean(successes)))
            # Merge after every policy, so a run cut short still leaves its finished records.
            merge_quality_records(Path(args.results), records, protocol_of(per_method_avg))
    protocol = protocol_of(per_method_avg)
    merge_quality_records(Path(args.results), records, protocol)
    print(json.dumps(protocol["summary"], indent=2))
    return protocol


def _spec(params, steps, cfg):
    from distcur.policy.functional import PolicySpec

    return PolicySpec(steps.state.shape[1], steps.action.shape[1], tuple(cfg.hidden))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    toy = sub.add_parser("toy")
    toy.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    toy.add_argument("--steps", type=int, default=400)
    toy.add_argument("--hidden", type=int, nargs="+", default=[32, 32])
    toy.add_argument("--scenarios", nargs="+", default=["labels", "kmeans4", "corrupt"],
                     choices=["labels", "kmeans4", "corrupt"])
    mw = sub.add_parser("metaworld")
    mw.add_argument("--store", default="/tmp/distcur-imbalanced")
    mw.add_argument("--tasks", nargs="+", default=["reach-v3", "button-press-v3", "drawer-close-v3"])
    mw.add_argument("--frequent", default=None, help="the task with ~10x demos (default: the first)")
    mw.add_argument("--frequent-demos", type=int, default=30)
    mw.add_argument("--rare-demos", type=int, default=3)
    mw.add_argument("--unused-target", default="door-open-v3")
    mw.add_argument("--data-seed", type=int, default=0)
    mw.add_argument("--methods", nargs="+", default=["uniform", "frequency", "dro", "metagrad"])
    mw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    mw.add_argument("--episodes", type=int, default=50)
    mw.add_argument("--eval-max-steps", type=int, default=500, help="rollout limit (MetaWorld's own: 500)")
    mw.add_argument("--hidden", type=int, nargs="+", default=[400, 400, 400])
    mw.add_argument("--train-steps", type=int, default=4000)
    mw.add_argument("--batch-size", type=int, default=256)
    mw.add_argument("--dro-steps", type=int, default=300)
    mw.add_argument("--meta-rounds", type=int, default=4)
    mw.add_argument("--meta-k", type=int, default=5)
    mw.add_argument("--meta-warmup", type=int, default=200)
    mw.add_argument("--results", default=str(RESULTS / "quality_metaworld.json"), help="JSON file to merge into")
    mw.add_argument("--rebalance-hidden", type=int, nargs="+", default=[128, 128],
                    help="policy of the DRO proxy/reference and the meta-gradient runs")
    mw.add_argument("--prepare-only", action="store_true", help="generate the data and the weights, then stop")
    mw.add_argument("--threads", type=int, default=1, help="torch threads")
    mw.add_argument("--no-ray", action="store_true", help="generate and evaluate in this process")
    args = p.parse_args(argv)
    run_toy(args) if args.part == "toy" else run_metaworld(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
