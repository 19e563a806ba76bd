"""DataMIL datamodel figures -> benchmarks/results/datamodels.json (docs/benchmarks.md, issue #5).

All speed figures are ratios measured in this run, at the datamodel's default subset model
(DatamodelConfig: MLP 128 x 128, batch 256, 39-d state, 4-d action), one torch thread per
process (as a 1-CPU Ray worker runs it), medians of ``--repeats`` runs with min and max:

* speedup_vs_loop_k64 / _k256: models x steps per second of stacked training of k models
  (distcur.policy.ensemble.train_ensemble) over a plain loop training the same models one at a
  time with the eager single-model step;
* speedup_vs_train_job_per_model: the same rate over one Ray Train TorchTrainer job per model
  (the naive design), measured on a few jobs training one model for the default step count;
* gemm_fraction: achieved training FLOP/s (3 x forward FLOPs per sample) at k = 64 over the
  float32 GEMM rate of torch.mm (1024^3) measured in the same run;
* metagrad_cost_ratio: one DataMIL meta-gradient run (T - K forward steps, then K steps
  differentiated with sqrt(K) checkpointing) over a plain training run of the same T steps;
  metagrad_cost_ratio_k_only also reports the last K steps alone;
* metagrad_peak_mem_ratio: peak process RSS over K differentiated steps (sqrt(K) checkpoints)
  over a plain run of K steps, fresh processes with the same data; the growth over the
  baseline is reported too (the plain run's is below the allocator's granularity);
* metagrad_fd_rel_err: meta-gradient vs central finite differences (float64, small MLP);
* lds: the regression datamodel's LDS on a MetaWorld development target (default config).

Usage: python benchmarks/bench_datamodels.py [--store DIR_WITH_METAWORLD] [--repeats 3] [--skip-lds]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from distcur.commands.datamodel import DatamodelConfig, MetagradSettings, RegressionSettings
from distcur.datamodels.metagrad import sqrt_checkpoint_every, weight_meta_gradient
from distcur.policy.ensemble import batch_weights, init_ensemble, sample_batches, train_ensemble, train_single
from distcur.policy.functional import AdamConfig, PolicySpec, adam_init, init_params, make_train_step
from distcur.policy.proxy import make_proxy_fn

DS, DA = 39, 4
N_POOL, N_CLUSTERS = 20000, 200
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "datamodels.json")


def stats(xs: list[float]) -> dict:
    return {"median": float(statistics.median(xs)), "min": float(min(xs)), "max": float(max(xs)), "runs": len(xs)}


def pool(seed: int = 0):
    rng = np.random.default_rng(seed)
    obs = torch.as_tensor(rng.normal(size=(N_POOL, DS)), dtype=torch.float32)
    act = torch.as_tensor(np.tanh(rng.normal(size=(N_POOL, DA))), dtype=torch.float32)
    group = torch.as_tensor(np.where(rng.random(N_POOL) < 0.1, -1, rng.integers(0, N_CLUSTERS, N_POOL)))
    return obs, act, group


def stacked_rate(spec, adam, data, k, steps, batch_size) -> float:
    obs, act, group = data
    masks = torch.as_tensor(np.random.default_rng(k).random((k, N_CLUSTERS)) < 0.5, dtype=torch.float32)
    batches = sample_batches(group.numpy(), steps + 1, batch_size, 0.25, seed=1)
    params, state = init_ensemble(spec, range(k))
    params, state, _ = train_ensemble(params, state, spec, adam, obs, act, group, masks, batches[:1])  # warm-up
    t = time.perf_counter()
    train_ensemble(params, state, spec, adam, obs, act, group, masks, batches[1:])
    return k * steps / (time.perf_counter() - t)


def loop_rate(spec, adam, data, n_models, steps, batch_size) -> float:
    """A plain one-model-at-a-time loop: the eager single-model step (torch.autograd.grad + Adam,
    the fastest single-model path, the one train_policy uses) on each model's own batch weights."""
    obs, act, group = data
    masks = torch.as_tensor(np.random.default_rng(0).random((n_models, N_CLUSTERS)) < 0.5, dtype=torch.float32)
    batches = sample_batches(group.numpy(), steps + 1, batch_size, 0.25, seed=1)
    step = make_train_step(spec, adam, functional=False)

    def train(i, rows_list):
        p = init_params(spec, i)
        state = adam_init(p)
        for idx in rows_list:
            rows = torch.as_tensor(idx)
            w = batch_weights(masks[i : i + 1], group[rows])[0]
            p, state, _ = step(p, state, obs[rows], act[rows], w)

    train(0, batches[:1])  # warm-up
    t = time.perf_counter()
    for i in range(n_models):
        train(i, batches[1:])
    return n_models * steps / (time.perf_counter() - t)


def gemm_rate(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def start_ray(tries: int = 4) -> None:
    """Start a new local Ray (2 CPUs; never join another running cluster), retrying: on a loaded
    shared machine node start-up can time out."""
    import ray

    for attempt in range(tries):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:  # Ray raises a bare Exception on a start-up timeout
            print(f"ray.init attempt {attempt + 1} failed: {e}", flush=True)
            ray.shutdown()
            time.sleep(10)
    raise RuntimeError("could not start a local Ray")


def torchtrainer_job_seconds(spec, steps, batch_size, jobs) -> list[float]:
    """Wall time of one Ray Train job (1 worker) per model, training it for ``steps`` steps."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray()
    data = pool()

    def train_one_model(config):
        torch.set_num_threads(1)
        obs, act, group = config["data"]
        mask = torch.as_tensor(np.random.default_rng(config["model"]).random(N_CLUSTERS) < 0.5, dtype=torch.float32)
        batches = sample_batches(group.numpy(), config["steps"], config["batch_size"], 0.25, seed=1)
        p = init_params(config["spec"], config["model"])
        train_single(p, adam_init(p), config["spec"], AdamConfig(), obs, act, group, mask, batches)

    out = []
    storage = tempfile.mkdtemp(prefix="dm-bench-train-")
    try:
        for j in range(jobs):
            t = time.perf_counter()
            TorchTrainer(
                train_one_model,
                train_loop_config={"data": data, "model": j, "steps": steps, "batch_size": batch_size, "spec": spec},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                run_config=ray.train.RunConfig(storage_path=storage, name=f"model-{j}"),
            ).fit()
            out.append(time.perf_counter() - t)
    finally:
        ray.shutdown()
    return out


def _batches_for(spec, steps, batch_size, seed=0):
    obs, act, group = pool(seed)
    idx = sample_batches(group.numpy(), steps, batch_size, 0.25, seed=2)
    g = torch.where(group < N_CLUSTERS // 2, group, torch.full_like(group, -1))  # half candidates, like DataMIL
    return [(obs[torch.as_tensor(b)], act[torch.as_tensor(b)], g[torch.as_tensor(b)]) for b in idx], obs, act


def metagrad_times(spec, adam, total_steps, meta_steps, batch_size) -> dict:
    batches, obs, act = _batches_for(spec, total_steps, batch_size)
    proxy = make_proxy_fn(spec, obs[:500], act[:500])
    step = make_train_step(spec, adam, "batch")
    ones = torch.ones(batch_size)
    p0 = init_params(spec, 0)

    def plain(n):
        p, o = p0, adam_init(p0)
        with torch.no_grad():
            for ob, ac, _ in batches[:n]:
                p, o, _ = step(p, o, ob, ac, ones)
        return p, o

    plain(2)  # warm-up
    t = time.perf_counter()
    plain(total_steps)
    t_plain_total = time.perf_counter() - t
    t = time.perf_counter()
    plain(meta_steps)
    t_plain_k = time.perf_counter() - t
    w = torch.zeros(N_CLUSTERS)
    t = time.perf_counter()
    p, o = plain(total_steps - meta_steps)
    t_fwd = time.perf_counter() - t
    t = time.perf_counter()
    weight_meta_gradient(p, o, spec, adam, batches[total_steps - meta_steps:], w, proxy,
                         sqrt_checkpoint_every(meta_steps))
    t_meta = time.perf_counter() - t
    return {"ratio_total": (t_fwd + t_meta) / t_plain_total, "ratio_k": t_meta / t_plain_k}


def memory_probe(mode: str, spec_hidden, total_steps, meta_steps, batch_size) -> dict:
    """Peak RSS of the process (MiB) over one run of K steps, and its growth over the baseline
    (data loaded, torch initialised), measured in this fresh process."""
    torch.set_num_threads(1)
    spec, adam = PolicySpec(DS, DA, tuple(spec_hidden)), AdamConfig()
    batches, obs, act = _batches_for(spec, meta_steps, batch_size)
    proxy = make_proxy_fn(spec, obs[:500], act[:500])
    step = make_train_step(spec, adam, "batch")

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    warm = init_params(spec, 1)  # initialise torch's kernels and allocator pools on a throwaway model
    weight_meta_gradient(warm, adam_init(warm), spec, adam, batches[:2], torch.zeros(N_CLUSTERS), proxy, 1)
    del warm
    # Baseline: data in memory, no model yet; the peak then counts params, Adam state,
    # activations (and for the meta-gradient its checkpoints and segment graph).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS:")
    p = init_params(spec, 0)
    o = adam_init(p)
    if mode == "plain":
        with torch.no_grad():
            for ob, ac, _ in batches:
                p, o, _ = step(p, o, ob, ac, torch.ones(batch_size))
    else:
        every = None if mode == "metagrad_no_checkpoint" else sqrt_checkpoint_every(meta_steps)
        weight_meta_gradient(p, o, spec, adam, batches, torch.zeros(N_CLUSTERS), proxy, every)
    peak = status("VmHWM:")
    return {"peak_rss_mib": peak, "growth_mib": max(peak - before, 0.0)}


def fd_rel_err() -> float:
    dt = torch.float64
    spec, adam = PolicySpec(5, 2, (8, 8)), AdamConfig(lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def draw(n):
        return torch.randn(n, 5, generator=g, dtype=dt), torch.tanh(torch.randn(n, 2, generator=g, dtype=dt))

    batches = [(*draw(16), torch.randint(-1, 4, (16,), generator=g)) for _ in range(8)]
    proxy = make_proxy_fn(spec, *draw(32))
    p, o = init_params(spec, 0, dt), None
    o = adam_init(p)
    step = make_train_step(spec, adam, "batch")
    for _ in range(5):
        p, o, _ = step(p, o, *draw(16), torch.ones(16, dtype=dt))
    w = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=dt)
    _, dw, _ = weight_meta_gradient(p, o, spec, adam, batches, w, proxy, checkpoint_every=3)
    eps = 1e-6
    fd = torch.tensor([
        (weight_meta_gradient(p, o, spec, adam, batches, w + eps * e, proxy)[0]
         - weight_meta_gradient(p, o, spec, adam, batches, w - eps * e, proxy)[0]) / (2 * eps)
        for e in torch.eye(4, dtype=dt)
    ], dtype=dt)
    return float((dw - fd).norm() / fd.norm())


def lds_on_metaworld(store_uri: str | None, target: str) -> dict:
    from distcur.commands.datamodel import run_datamodel
    from distcur.store import Store

    if store_uri is None:
        from distcur.sources.metaworld import MetaWorldPriorConfig, generate_metaworld

        store_uri = tempfile.mkdtemp(prefix="dm-bench-store-")
        generate_metaworld(MetaWorldPriorConfig(target=target), Store(store_uri), progress=False)
    store = Store(store_uri)
    start_ray()
    run = f"bench-datamodel-{int(time.time())}"
    t = time.perf_counter()
    m = run_datamodel(store, "regression", target, run, DatamodelConfig())
    return {"lds": m.metadata["lds"], "store": store_uri, "target": target, "clusters": m.metadata["clusters"],
            "penalty": m.metadata["penalty"], "wall_s": time.perf_counter() - t,
            "proxy_std": m.metadata["proxy_std"], "proxy": DatamodelConfig().proxy,
            "num_models": RegressionSettings().num_models,
            "tau_split_half_spearman": m.metadata["tau_split_half_spearman"],
            "tau_top10_overlap": m.metadata["tau_top10_overlap"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None, help="store holding steps/source=metaworld and the target")
    ap.add_argument("--target", default="pick-place-wall-v3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per speed measurement")
    ap.add_argument("--jobs", type=int, default=2, help="TorchTrainer jobs to time")
    ap.add_argument("--skip-lds", action="store_true")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = DatamodelConfig()
    reg, mg = RegressionSettings(), MetagradSettings()
    if args.probe:
        print(json.dumps(memory_probe(args.probe, cfg.hidden, mg.total_steps, mg.meta_steps, cfg.batch_size)))
        return 0
    torch.set_num_threads(1)
    spec, adam = PolicySpec(DS, DA, tuple(cfg.hidden)), AdamConfig(lr=cfg.lr)
    data = pool()
    t0 = time.time()
    res: dict = {}
    rates = {"stacked64": [], "stacked256": [], "loop": [], "gemm": []}
    for _ in range(args.repeats):
        rates["gemm"].append(gemm_rate())
        rates["stacked64"].append(stacked_rate(spec, adam, data, 64, args.steps, cfg.batch_size))
        rates["stacked256"].append(stacked_rate(spec, adam, data, 256, args.steps, cfg.batch_size))
        rates["loop"].append(loop_rate(spec, adam, data, 4, args.steps, cfg.batch_size))
        print({k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
    flops_per_model_step = 3 * spec.flops_per_sample() * cfg.batch_size
    sp64 = [a / b for a, b in zip(rates["stacked64"], rates["loop"])]
    sp256 = [a / b for a, b in zip(rates["stacked256"], rates["loop"])]
    gfrac = [r * flops_per_model_step / g for r, g in zip(rates["stacked64"], rates["gemm"])]
    res["speedup_vs_loop_k64"] = stats(sp64)
    res["speedup_vs_loop_k256"] = stats(sp256)
    res["gemm_fraction"] = stats(gfrac)
    res["gemm_fraction_k256"] = stats([r * flops_per_model_step / g for r, g in zip(rates["stacked256"], rates["gemm"])])
    res["rates_model_steps_per_s"] = {k: stats(v) for k, v in rates.items() if k != "gemm"}
    res["gemm_gflops"] = stats([g / 1e9 for g in rates["gemm"]])

    job_s = torchtrainer_job_seconds(spec, reg.steps, cfg.batch_size, args.jobs)
    job_rate = [reg.steps / s for s in job_s]  # one model per job
    vm = statistics.median(rates["stacked64"])
    res["speedup_vs_train_job_per_model"] = stats([vm / r for r in job_rate])
    res["train_job_seconds_per_model"] = stats(job_s)
    print("jobs", job_s, flush=True)

    ratios = [metagrad_times(spec, adam, mg.total_steps, mg.meta_steps, cfg.batch_size) for _ in range(args.repeats)]
    res["metagrad_cost_ratio"] = stats([r["ratio_total"] for r in ratios])
    res["metagrad_cost_ratio_k_only"] = stats([r["ratio_k"] for r in ratios])
    mem = {}
    for mode in ("plain", "metagrad", "metagrad_no_checkpoint"):
        out = subprocess.run([sys.executable, __file__, "--probe", mode], capture_output=True, text=True, check=True)
        mem[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    res["metagrad_peak_mem_mib"] = mem
    res["metagrad_peak_mem_ratio"] = mem["metagrad"]["peak_rss_mib"] / mem["plain"]["peak_rss_mib"]
    res["metagrad_peak_mem_ratio_no_checkpoint"] = (mem["metagrad_no_checkpoint"]["peak_rss_mib"]
                                                    / mem["plain"]["peak_rss_mib"])
    res["metagrad_fd_rel_err"] = fd_rel_err()
    print({k: v for k, v in res.items() if k.startswith("metagrad")}, flush=True)

    if not args.skip_lds:
        info = lds_on_metaworld(args.store, args.target)
        res["lds"] = info["lds"]
        res["lds_run"] = info
    res["inputs"] = {
        "subset_model": {"hidden": list(cfg.hidden), "state_dim": DS, "action_dim": DA, "batch_size": cfg.batch_size},
        "regression": reg.__dict__, "metagrad": mg.__dict__, "timed_steps": args.steps, "repeats": args.repeats,
        "loop_models": 4, "pool_rows": N_POOL, "clusters": N_CLUSTERS, "torch_threads": 1, "train_jobs": args.jobs,
    }
    res["machine"] = {
        "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__,
        "blas": [ln.strip() for ln in torch.__config__.show().splitlines() if "BLAS" in ln or "MKL" in ln][:4],
        "loadavg_at_end": os.getloadavg(),
    }
    res["wall_s"] = time.time() - t0
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(res, f, indent=2, default=float)
    print(json.dumps({k: (v["median"] if isinstance(v, dict) and "median" in v else v) for k, v in res.items()
                      if k in ("speedup_vs_loop_k64", "speedup_vs_loop_k256", "speedup_vs_train_job_per_model",
                               "gemm_fraction", "metagrad_cost_ratio", "metagrad_peak_mem_ratio",
                               "metagrad_fd_rel_err", "lds")}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
