"""The Ray Train executor against today's paths -> benchmarks/results/datamodels.json (issue #17 item 4).

* ``ray_train_overhead``: wall time of the datamodel stage's subset-model batches on one
  TorchTrainer (2 workers, trainer start-up included) over the same batches as Ray tasks
  (2 CPUs), each into a fresh store; goal <= 1.10.
* ``metagrad_parallel_speedup``: the meta-gradient iterations (distcur recipe, the default
  sizes: T = 500, K = 50, 128 x 128) on 2 Ray Train workers (start-up included) over the
  driver loop of :func:`~distcur.datamodels.metagrad.datamil_metagrad_scores`; goal >= 1.7.

Both run the stage's own code (``run_subset_batches``, ``run_metagrad_iterations``) on a
synthetic pool of the bench_datamodels shape (20k rows, 39-d states, 200 clusters). Ray is
started once before timing (both paths need it). ``bench_datamodels.py`` writes other keys of
the same file: this script reads it, replaces only its own keys and writes it back atomically.

    python benchmarks/bench_ray_train.py [--models 1024] [--iterations 32] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_facts, summarize  # noqa: E402

from distcur.datamodels.metagrad import (
    MetagradFold,  # noqa: E402
    datamil_metagrad_scores,  # noqa: E402
)
from distcur.datamodels.subsets import (  # noqa: E402
    SubsetTrainingData,
    SubsetTrainSettings,  # noqa: E402
    subset_masks,
)
from distcur.distributed.raytrain import (
    RayTrain,  # noqa: E402
    RayTrainSettings,  # noqa: E402
)
from distcur.distributed.session import ensure_ray  # noqa: E402
from distcur.distributed.tasks import RayTasks  # noqa: E402
from distcur.policy.functional import AdamConfig, PolicySpec  # noqa: E402
from distcur.policy.proxy import make_proxy_fn  # noqa: E402
from distcur.stages.datamodel import (  # noqa: E402
    DatamodelConfig,
    MetagradSettings,
    RegressionSettings,
    run_metagrad_iterations,
    run_subset_batches,
)
from distcur.store import Store  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "datamodels.json")
KEYS = ("ray_train_overhead", "metagrad_parallel_speedup", "ray_train_run")
DS, DA = 39, 4
N_POOL, N_CLUSTERS, N_PROXY = 20000, 200, 500
INPUTS = {"steps/source=synthetic": "bench"}


def synthetic_data(seed: int = 0) -> SubsetTrainingData:
    rng = np.random.default_rng(seed)
    return SubsetTrainingData(
        obs=rng.normal(size=(N_POOL, DS)).astype(np.float32),
        act=np.tanh(rng.normal(size=(N_POOL, DA))).astype(np.float32),
        group=rng.integers(0, N_CLUSTERS, N_POOL).astype(np.int64),
        n_clusters=N_CLUSTERS,
        proxy_obs=rng.normal(size=(N_PROXY, DS)).astype(np.float32),
        proxy_act=np.tanh(rng.normal(size=(N_PROXY, DA))).astype(np.float32),
    )


def time_batches(executor: str, data, spec, cfg: DatamodelConfig, n_models: int, workers: RayTrainSettings) -> float:
    r = cfg.regression
    models = np.arange(n_models)
    masks = subset_masks(models, N_CLUSTERS, r.keep_prob, cfg.seed)
    settings = SubsetTrainSettings(spec, AdamConfig(lr=cfg.lr), r.steps, cfg.batch_size, 0.0, cfg.seed,
                                   shared_init=r.common_random_numbers, proxy=cfg.proxy)
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        t0 = time.perf_counter()
        runner = RayTrain(workers) if executor == "ray-train" else RayTasks(max_retries=1)
        _, st = run_subset_batches(store, "bench", models, masks, data, settings, r.models_per_batch, INPUTS, runner)
        wall = time.perf_counter() - t0
    assert st["trained"] == len(range(0, n_models, r.models_per_batch)), st
    print(f"  batches {executor}: {wall:.1f} s ({st['trained']} batches)", flush=True)
    return wall


def time_metagrad(parallel: bool, data, spec, cfg: DatamodelConfig, iterations: int,
                  workers: RayTrainSettings) -> tuple[float, np.ndarray]:
    mg = cfg.metagrad
    run_cfg = mg.run_config(iterations, cfg.batch_size, 0.0, cfg.seed)
    adam = AdamConfig(lr=cfg.lr)
    t0 = time.perf_counter()
    if parallel:
        with tempfile.TemporaryDirectory() as d:
            (grads, _, _), = run_metagrad_iterations(Store(d), "bench", [MetagradFold(0, data, spec, adam, run_cfg,
                                                                                      cfg.proxy)], INPUTS,
                                                     RayTrain(workers))
    else:
        proxy_fn = make_proxy_fn(spec, torch.as_tensor(data.proxy_obs), torch.as_tensor(data.proxy_act), cfg.proxy)
        grads, _ = datamil_metagrad_scores(spec, adam, torch.as_tensor(data.obs), torch.as_tensor(data.act),
                                           torch.as_tensor(data.group), N_CLUSTERS, proxy_fn, run_cfg)
    wall = time.perf_counter() - t0
    print(f"  meta-gradient {'ray-train' if parallel else 'driver'}: {wall:.1f} s", flush=True)
    return wall, grads


def update_results(path: str, figures: dict, both_parts: bool) -> dict:
    """Read ``path``, replace only this script's keys, write it back atomically. ``ray_train_run``:
    a run of both parts replaces it; a ``--skip-batches`` / ``--skip-metagrad`` run replaces only
    its part's entries, so two partial runs add up."""
    res = {}
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
    for k, v in figures.items():
        partial = k == "ray_train_run" and not both_parts and isinstance(res.get(k), dict)
        res[k] = {**res[k], **v} if partial else v
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2, default=float)
    os.replace(tmp, path)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=RegressionSettings().num_models,
                   help="subset models (default: the datamodel default, 1024)")
    p.add_argument("--iterations", type=int, default=32, help="meta-gradient iterations")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="timed pairs (the batches' order alternates)")
    p.add_argument("--skip-batches", action="store_true")
    p.add_argument("--skip-metagrad", action="store_true")
    p.add_argument("--batch-steps", type=int, default=RegressionSettings().steps, help="steps per subset model")
    p.add_argument("--metagrad-steps", type=int, nargs=2, metavar=("T", "K"),
                   default=(MetagradSettings().total_steps, MetagradSettings().meta_steps))
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    torch.set_num_threads(min(args.workers, os.cpu_count() or 1))  # the driver loop gets the same cores
    cfg = DatamodelConfig(regression=RegressionSettings(steps=args.batch_steps),
                          metagrad=MetagradSettings(total_steps=args.metagrad_steps[0],
                                                    meta_steps=args.metagrad_steps[1]))
    spec = PolicySpec(DS, DA, tuple(cfg.hidden))
    data = synthetic_data()
    workers = RayTrainSettings(num_workers=args.workers)
    load_start = os.getloadavg()
    ensure_ray(num_cpus=args.workers)
    t_start = time.time()
    figures: dict = {}
    run: dict = {"workers": args.workers, "cpus_per_worker": workers.cpus_per_worker}
    start = {"load_average_at_start": [round(x, 2) for x in load_start]}
    if not args.skip_batches:
        tasks, train = [], []
        for i in range(args.repeats):  # alternating which goes first: the load drifts
            order = ("ray-tasks", "ray-train") if i % 2 == 0 else ("ray-train", "ray-tasks")
            walls = {ex: time_batches(ex, data, spec, cfg, args.models, workers) for ex in order}
            tasks.append(walls["ray-tasks"])
            train.append(walls["ray-train"])
        ratios = [b / a for a, b in zip(tasks, train)]
        figures["ray_train_overhead"] = {**summarize(ratios), "goal": "<= 1.10"}
        run["batches"] = {**start, "models": args.models, "models_per_batch": cfg.regression.models_per_batch,
                          "steps": cfg.regression.steps, "hidden": list(cfg.hidden), "batch_size": cfg.batch_size,
                          "ray_tasks_wall_s": summarize(tasks), "ray_train_wall_s": summarize(train),
                          "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    if not args.skip_metagrad:
        serial, parallel, diffs = [], [], []
        for _ in range(args.repeats):
            t_serial, g_serial = time_metagrad(False, data, spec, cfg, args.iterations, workers)
            t_par, g_par = time_metagrad(True, data, spec, cfg, args.iterations, workers)
            # the same numbers up to float summation order (the driver runs 2 torch threads, a worker 1)
            diffs.append(float(np.abs(g_par - g_serial).max() / max(np.abs(g_serial).max(), 1e-30)))
            serial.append(t_serial)
            parallel.append(t_par)
        figures["metagrad_parallel_speedup"] = {**summarize([a / b for a, b in zip(serial, parallel)]),
                                                "goal": ">= 1.7"}
        mg = cfg.metagrad
        run["metagrad"] = {**start, "iterations": args.iterations, "recipe": mg.recipe, "total_steps": mg.total_steps,
                           "meta_steps": mg.meta_steps, "hidden": list(cfg.hidden), "batch_size": cfg.batch_size,
                           "driver_torch_threads": torch.get_num_threads(), "driver_wall_s": summarize(serial),
                           "ray_train_wall_s": summarize(parallel), "max_score_diff_over_max_score": max(diffs),
                           "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    part = "metagrad" if args.skip_batches else "batches" if args.skip_metagrad else "both"
    run[f"wall_s_{part}"] = round(time.time() - t_start, 1)
    run[f"machine_{part}"] = machine_facts()
    figures["ray_train_run"] = run
    update_results(args.out, figures, both_parts=part == "both")
    print(json.dumps({k: v["median"] for k, v in figures.items() if isinstance(v, dict) and "median" in v}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
