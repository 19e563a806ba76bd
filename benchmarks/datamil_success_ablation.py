"""DataMIL's own ablation, one target: a regression datamodel fit on rollout success instead of the proxy.

The question (does the proxy track what helps the policy?) answered on the policies themselves:

1. ``--models`` random subsets of the prior's *tasks* (each kept with ``--keep-prob``, the
   regression datamodel's default 0.5), one protocol-size policy co-trained on the target demos
   plus each subset (the demo's recipe: alpha, steps, net), each evaluated by ``--episodes``
   MetaWorld rollouts (seed 0 for every policy: the same initial states, paired) and by both
   proxies (held-out BC NLL and action MSE on the target's held-out demos);
2. over those policies: the Spearman of each proxy with success (a proxy that tracks success is
   negatively correlated: lower loss, more success);
3. three task-level regression datamodels on the same masks: y = success, y = proxy NLL,
   y = proxy MSE (their tau, task scores = tau for success and -tau for the losses), compared by
   Spearman with each other and with the stored episode-level DataMIL datamodel's scores averaged
   per task; where the target task ranks in each;
4. each task datamodel's selection at the protocol budget (10% of prior steps; tasks in score
   order, episodes of the last task by the seeded permutation), trained and evaluated like the
   demo's methods (``--final-seeds`` x ``--final-episodes``), beside the store's own rows.

Task clusters, not episode clusters: ~1000 rollout-evaluated policies for the episode-level
datamodel (its default 1024 subsets) are out of reach on 2 cores (about a day); 64 subsets over
~50 tasks are not. Every policy's row is committed to the store as it finishes
(``evals/ablation-success/...``), so a rerun trains only the missing ones.

    python benchmarks/datamil_success_ablation.py --store /path/to/datamil-ppw --target pick-place-wall-v3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow as pa
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_facts, write_result  # noqa: E402

from distcur.config import load_config, merge_options  # noqa: E402
from distcur.data import scores_key, selection_key, steps_key  # noqa: E402
from distcur.datamodels.regression import fit_linear_datamodel  # noqa: E402
from distcur.datamodels.subsets import subset_masks  # noqa: E402
from distcur.distributed.tasks import RayTasks  # noqa: E402
from distcur.schema import SELECTION_SCHEMA  # noqa: E402
from distcur.select import SelectConfig  # noqa: E402
from distcur.sources.metaworld import PRIOR_SOURCE  # noqa: E402
from distcur.stages.demo import PROTOCOL_POLICY, DemoConfig  # noqa: E402
from distcur.stages.output import commit_table  # noqa: E402
from distcur.stages.select import select  # noqa: E402
from distcur.store import Store, fingerprint  # noqa: E402

RUN = "ablation-success"
KINDS = ("success", "nll", "mse")


def job(store_uri: str, cfg: DemoConfig, method: str, selection_run: str, seed: int, episodes: int) -> dict:
    """One policy: the demo's co-training recipe on (target, selection), success and both proxies."""
    import torch

    from distcur.stages import evaluate

    torch.set_num_threads(1)
    return evaluate.train_and_evaluate(Store(store_uri), cfg.target, selection_run,
                                       cfg.policy_config(seed, selected=True), method, episodes,
                                       cfg.evaluation.max_steps, also_proxies=("nll", "mse"))


def run_jobs(store: Store, cfg: DemoConfig, specs: list[tuple[str, str, int, int]], inputs: dict) -> dict:
    """{method: row} for (method, selection run, seed, episodes); committed rows are reused."""
    def key(method: str, seed: int) -> str:
        return f"evals/{RUN}/jobs/{method}/seed={seed}"

    config = {k: v for k, v in cfg.flat().items() if k.startswith("train.") or k in ("target", "max_steps")}

    def spec_config(s):
        return {**config, "method": s[0], "seed": s[2], "episodes": s[3]}

    def spec_inputs(s):
        return {**inputs, "selection": store.input_fingerprint(selection_key(s[1]))}

    rows = {s[0]: store.read_table(key(s[0], s[2])).to_pylist()[0] for s in specs
            if store.is_done(key(s[0], s[2]), "ablation-job", spec_config(s), spec_inputs(s))}
    todo = [s for s in specs if s[0] not in rows]
    print(f"{len(rows)} of {len(specs)} policies committed, training {len(todo)}", flush=True)

    def commit(i: int, row: dict) -> None:
        s = todo[i]
        commit_table(store, key(s[0], s[2]), "ablation-job", spec_config(s), spec_inputs(s),
                     lambda: (pa.Table.from_pylist([row]), None), force=True, quiet=True)
        rows[s[0]] = row

    if todo:
        RayTasks(cfg.address, max_retries=2, label="policies", unit="job").each(
            job, [(store.uri, cfg, m, sel, seed, eps) for m, sel, seed, eps in todo], on_result=commit,
            describe=lambda r: (f"{r['method']} seed {r['seed']}: success {r['success']:.2f}, nll "
                                f"{r['proxy_nll']:.3f}, mse {r['proxy_mse']:.4f}", f"{r['method']}"))
    return rows


def write_selection(store: Store, run: str, steps: pa.Table, keep: np.ndarray, config: dict, inputs: dict) -> None:
    """The steps of the kept rows (weight 1) as ``selections/<run>``."""
    def make():
        sub = steps.filter(pa.array(keep))
        table = pa.table({"source": sub.column("source"), "episode": sub.column("episode"),
                          "step": sub.column("step"), "weight": pa.array(np.ones(sub.num_rows, np.float32))})
        return table.cast(SELECTION_SCHEMA), {"selected_fraction": sub.num_rows / steps.num_rows}

    commit_table(store, selection_key(run), "select", config, inputs, make, quiet=True)


def task_scores_table(steps: pa.Table, task_of_step: np.ndarray, score: np.ndarray) -> pa.Table:
    return pa.table({"source": steps.column("source"), "episode": steps.column("episode"),
                     "step": steps.column("step"), "score": pa.array(score[task_of_step], pa.float64())})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="a `distcur demo --protocol-policy` store of this target")
    ap.add_argument("--target", required=True)
    ap.add_argument("--prior", default="datamil", choices=("datamil", "hard"))
    ap.add_argument("--models", type=int, default=64)
    ap.add_argument("--keep-prob", type=float, default=0.5)
    ap.add_argument("--episodes", type=int, default=20, help="rollouts per subset policy")
    ap.add_argument("--final-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--final-episodes", type=int, default=50)
    ap.add_argument("--final-kinds", nargs="+", choices=KINDS, default=list(KINDS),
                    help="the task datamodels whose selections are trained (all three are fit)")
    ap.add_argument("--seed", type=int, default=0, help="the subsets' seed")
    ap.add_argument("--run", default="demo", help="the demo run whose rows and datamodel are compared")
    ap.add_argument("--train-steps", type=int, default=None, help="override the protocol's steps (a smoke run only)")
    args = ap.parse_args()
    t_start = time.time()
    cfg = load_config(DemoConfig, merge_options(dict(PROTOCOL_POLICY), {
        "prior_kind": args.prior, "target": args.target, "store": args.store, "run": args.run,
        **({"train": {"steps": args.train_steps}} if args.train_steps else {})}))
    store = Store(args.store)
    prior_key = steps_key(PRIOR_SOURCE)
    steps = store.read_table(prior_key, columns=["source", "episode", "step", "task", "success"])
    tasks, task_of_step = np.unique(np.asarray(steps.column("task").to_pylist(), dtype=object), return_inverse=True)
    tasks = [str(t) for t in tasks]
    target_index = tasks.index(args.target) if args.target in tasks else None
    inputs = {prior_key: store.input_fingerprint(prior_key)}
    masks = subset_masks(range(args.models), len(tasks), args.keep_prob, args.seed)
    for i in np.flatnonzero(~masks.any(axis=1)):  # a policy needs some prior (only with very few tasks)
        masks[i, i % len(tasks)] = True

    # 1. the subset policies
    specs = []
    for i, mask in enumerate(masks):
        run = f"{RUN}-subset-{i}"
        write_selection(store, run, steps, mask[task_of_step],
                        {"tasks": [t for t, k in zip(tasks, mask) if k], "keep_prob": args.keep_prob}, inputs)
        specs.append((f"subset-{i}", run, 0, args.episodes))
    rows = run_jobs(store, cfg, specs, inputs)
    y = {"success": np.array([rows[f"subset-{i}"]["success"] for i in range(args.models)]),
         "nll": np.array([rows[f"subset-{i}"]["proxy_nll"] for i in range(args.models)]),
         "mse": np.array([rows[f"subset-{i}"]["proxy_mse"] for i in range(args.models)])}

    # 2. does each proxy track success over these policies?
    proxy_vs_success = {k: float(spearmanr(y[k], y["success"])[0]) for k in ("nll", "mse")}

    # 3. three task datamodels on the same masks; score = +tau (success), -tau (losses)
    scores, fits = {}, {}
    for kind in KINDS:
        fit = fit_linear_datamodel(masks, y[kind], "auto", 5, args.seed)
        scores[kind] = np.asarray(fit.tau) * (1.0 if kind == "success" else -1.0)
        fits[kind] = {"penalty": fit.penalty, "alpha": float(fit.alpha), "nonzero": int(np.sum(fit.tau != 0)),
                      "cv_mse": float(fit.cv_mse), "y_var": float(np.var(y[kind]))}
    stored = {}
    frame = steps.select(["source", "episode", "step"]).to_pandas().assign(task=task_of_step)
    for est in ("regression", "metagrad"):
        key = scores_key(f"{args.run}-datamodel-{est}")
        if store.manifest(key) is not None:  # the stored episode-level datamodel, its step scores per task
            s = store.read_table(key, columns=["source", "episode", "step", "score"]).to_pandas()
            joined = frame.merge(s, on=["source", "episode", "step"], how="inner")
            stored[est] = joined.groupby("task").score.mean().reindex(range(len(tasks))).to_numpy()
    agreement = {}
    names = {**{k: scores[k] for k in KINDS}, **{f"stored-{k}": v for k, v in stored.items()}}
    for a in names:
        for b in names:
            if a < b:
                agreement[f"{a}~{b}"] = float(spearmanr(names[a], names[b])[0])

    def rank_of_target(s: np.ndarray) -> int | None:
        return None if target_index is None else int(np.sum(s > s[target_index])) + 1

    per_task = [{"task": t, "kept_in": int(masks[:, j].sum()),
                 "steps": int(np.sum(task_of_step == j)),
                 "successful_steps": int(np.sum((task_of_step == j) & steps.column("success").to_numpy())),
                 **{f"score_{k}": float(v[j]) for k, v in names.items()}} for j, t in enumerate(tasks)]

    # 4. each task datamodel's selection at the protocol budget, trained like the demo's methods
    final_specs, made = [], {}
    for kind in KINDS:
        srun = f"{RUN}-scores-{kind}"
        commit_table(store, scores_key(srun), "score", {"ablation": kind, "models": args.models,
                                                         "keep_prob": args.keep_prob, "seed": args.seed,
                                                         "episodes": args.episodes},
                     {**inputs, "rows": fingerprint(sorted((k, r["success"], r["proxy_nll"]) for k, r in rows.items()))},
                     lambda kind=kind: (task_scores_table(steps, task_of_step, scores[kind]),
                                        {"method": f"datamodel-{kind}-tasks", "target": args.target}), quiet=True)
        m = select(store, srun, f"{RUN}-{kind}", SelectConfig(budget_percent=cfg.budget_percent, level="episode",
                                                              tie_seed=cfg.tie_seed))
        sel = store.read_table(selection_key(f"{RUN}-{kind}"), columns=["source", "episode", "step"]).to_pandas()
        picked = frame.merge(sel, on=["source", "episode", "step"], how="inner")
        comp = m.metadata.get("composition") or {}
        made[kind] = {"selected_fraction": m.metadata.get("selected_fraction"),
                      "tasks": {tasks[t]: int(n) for t, n in picked.task.value_counts().items()},
                      "success_share": comp.get("success_share"),
                      "target_failure_share": comp.get("target_failure_share")}
        for seed in (args.final_seeds if kind in args.final_kinds else []):
            final_specs.append((f"datamodel-{kind}-tasks-seed{seed}", f"{RUN}-{kind}", seed, args.final_episodes))
    final_rows = run_jobs(store, cfg, final_specs, inputs)
    final = {}
    for kind in args.final_kinds:
        vals = {seed: final_rows[f"datamodel-{kind}-tasks-seed{seed}"]["success"] for seed in args.final_seeds}
        final[f"datamodel-{kind}-tasks"] = {"success_by_seed": vals, "success_mean": float(np.mean(list(vals.values()))),
                                            **made[kind]}
    # the store's own rows of the demo at the same seeds
    from distcur.stages.demo import job_key

    for method in ("random", "random-episode", "datamodel-regression", "datamodel-metagrad", "iwr", "br", "strap",
                   "ar", "sr", "oracle", "all", "target_only"):
        vals = {}
        for seed in args.final_seeds:
            k = job_key(args.run, method, seed)
            if store.manifest(k) is not None:
                vals[seed] = store.read_table(k).to_pylist()[0]["success"]
        if vals:
            final[method] = {"success_by_seed": vals, "success_mean": float(np.mean(list(vals.values())))}

    out = {
        "what": "DataMIL's ablation: task-level regression datamodels on rollout success vs on the proxy, fit on "
                "the same random task subsets' co-trained policies; their selections at the protocol budget",
        "target": args.target, "prior": args.prior, "store": os.path.basename(os.path.normpath(args.store)),
        "tasks": len(tasks), "target_task_in_prior": target_index is not None,
        "subset_policies": {"models": args.models, "keep_prob": args.keep_prob, "episodes": args.episodes,
                            "seed": 0, "success_mean": float(y["success"].mean()),
                            "success_min": float(y["success"].min()), "success_max": float(y["success"].max())},
        "spearman_proxy_vs_success_over_policies": proxy_vs_success,
        "datamodel_fits": fits,
        "spearman_between_task_scores": agreement,
        "target_task_rank": {k: rank_of_target(v) for k, v in names.items()},
        "top_tasks": {k: [tasks[j] for j in np.argsort(-v, kind="stable")[:8]] for k, v in names.items()},
        "per_task": per_task,
        "final": final,
        "final_protocol": {"seeds": args.final_seeds, "episodes": args.final_episodes,
                           "budget_percent": cfg.budget_percent, "level": "episode (tasks in score order)"},
        "wall_s": round(time.time() - t_start, 1), "machine": machine_facts(),
    }
    path = write_result("datamil_success_ablation", out)
    print(path)
    for k, v in final.items():
        print(f"{k:<28} {v['success_mean']:.3f}  {v.get('selected_fraction') or ''}")
    print("proxy vs success over subset policies:", proxy_vs_success)
    print("target task rank:", out["target_task_rank"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
