"""DataMIL datamodel figures -> benchmarks/results/datamodels.json (docs/benchmarks.md, issue #5).

All speed figures are ratios measured in this run, at the datamodel's default subset model
(DatamodelConfig: MLP 128 x 128, batch 256, 39-d state, 4-d action), one torch thread per
process (as a 1-CPU Ray worker runs it). The machine is shared, so the stacked-step figures are
the best of ``--repeats`` interleaved runs (``best``: the ratio of the best rates), timed by the
CPU time of the one thread doing the work (``time.thread_time``: time spent waiting for a core
held by another process is not the step's), with median, min and max of the per-run ratios and
the same figures by wall clock (``*_wall``); the load average is recorded beside them:

* speedup_vs_loop_k64 / _k256: models x steps per second of stacked training of k models
  (distcur.policy.ensemble.train_ensemble) over a plain loop training the same models one at a
  time with the eager single-model step;
* speedup_vs_train_job_per_model: the best wall-clock stacked rate at k = 64 over one Ray Train
  TorchTrainer job per model (the naive design), measured on a few jobs training one model for
  the default step count;
* gemm_fraction (k = 64) / gemm_fraction_k256: achieved training FLOP/s (3 x forward FLOPs per
  sample) over the float32 GEMM rate of torch.mm (1024^3) measured in the same run, which is
  recorded beside each (``gemm_gflops``);
* threads2: the same figures by wall clock with torch.set_num_threads(2) beside 1 (a GEMM twice
  as fast, as on a machine with a faster BLAS; only meaningful when two cores are free);
* step_profile: an operator-level profile (torch.profiler, CPU) of stacked steps at k = 64 and
  256: the top operators by self time, their share, and the share of all GEMM operators;
* metagrad_cost_ratio: one DataMIL meta-gradient run (T - K forward steps, then K steps
  differentiated with sqrt(K) checkpointing) over a plain training run of the same T steps;
  metagrad_cost_ratio_k_only also reports the last K steps alone;
* metagrad_peak_mem_ratio: peak process RSS over K differentiated steps (sqrt(K) checkpoints)
  over a plain run of K steps, fresh processes with the same data; the growth over the
  baseline is reported too (the plain run's is below the allocator's granularity);
* metagrad_fd_rel_err: meta-gradient vs central finite differences (float64, small MLP);
* lds: the regression datamodel's LDS on a MetaWorld development target (default config).

Usage: python benchmarks/bench_datamodels.py [--store DIR_WITH_METAWORLD] [--repeats 5] [--skip-lds]

The file is updated, not replaced: the keys this script does not write are kept.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_facts, update_result  # noqa: E402

from distcur.datamodels.metagrad import sqrt_checkpoint_every, weight_meta_gradient
from distcur.policy.ensemble import batch_weights, init_ensemble, sample_batches, train_ensemble, train_single
from distcur.policy.functional import AdamConfig, PolicySpec, adam_init, init_params, make_train_step
from distcur.policy.proxy import make_proxy_fn
from distcur.stages.datamodel import DatamodelConfig, MetagradSettings, RegressionSettings

DS, DA = 39, 4
N_POOL, N_CLUSTERS = 20000, 200


def stats(xs: list[float]) -> dict:
    return {"median": float(statistics.median(xs)), "min": float(min(xs)), "max": float(max(xs)), "runs": len(xs)}


def pool(seed: int = 0):
    rng = np.random.default_rng(seed)
    obs = torch.as_tensor(rng.normal(size=(N_POOL, DS)), dtype=torch.float32)
    act = torch.as_tensor(np.tanh(rng.normal(size=(N_POOL, DA))), dtype=torch.float32)
    group = torch.as_tensor(np.where(rng.random(N_POOL) < 0.1, -1, rng.integers(0, N_CLUSTERS, N_POOL)))
    return obs, act, group


def timed(fn) -> dict:
    """Run ``fn()``; its wall time and the CPU time of this thread, in seconds."""
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return {"wall": time.perf_counter() - w, "cpu": time.thread_time() - c}


def stacked_rate(spec, adam, data, k, steps, batch_size) -> dict:
    """Model-steps per second of train_ensemble on k models, by wall clock and thread CPU time."""
    obs, act, group = data
    masks = torch.as_tensor(np.random.default_rng(k).random((k, N_CLUSTERS)) < 0.5, dtype=torch.float32)
    batches = sample_batches(group.numpy(), steps + 1, batch_size, 0.25, seed=1)
    params, state = init_ensemble(spec, range(k))
    params, state, _ = train_ensemble(params, state, spec, adam, obs, act, group, masks, batches[:1])  # warm-up
    t = timed(lambda: train_ensemble(params, state, spec, adam, obs, act, group, masks, batches[1:]))
    return {c: k * steps / s for c, s in t.items()}


def loop_rate(spec, adam, data, n_models, steps, batch_size) -> dict:
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
    t = timed(lambda: [train(i, batches[1:]) for i in range(n_models)])
    return {c: n_models * steps / s for c, s in t.items()}


def gemm_rate(n: int = 1024, reps: int = 5) -> dict:
    """FLOP/s of a float32 n^3 torch.mm, by wall clock and thread CPU time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = timed(lambda: [torch.mm(a, b) for _ in range(reps)])
    return {c: 2 * n**3 * reps / s for c, s in t.items()}


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::addbmm")


def step_profile(spec, adam, data, k, batch_size, steps: int = 3, top: int = 12) -> dict:
    """Operator-level profile (torch.profiler, CPU) of ``steps`` stacked steps of k models: the
    ``top`` operators by self time (ms per step, share of all self time, calls per step) and
    the share of all GEMM operators. The profiler's times are wall-clock: on a loaded machine
    they include waits for a core, spread over every operator."""
    from torch.profiler import ProfilerActivity, profile

    obs, act, group = data
    masks = torch.as_tensor(np.random.default_rng(k).random((k, N_CLUSTERS)) < 0.5, dtype=torch.float32)
    batches = sample_batches(group.numpy(), steps + 1, batch_size, 0.25, seed=1)
    params, state = init_ensemble(spec, range(k))
    params, state, _ = train_ensemble(params, state, spec, adam, obs, act, group, masks, batches[:1])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_ensemble(params, state, spec, adam, obs, act, group, masks, batches[1:])
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return {
        "k": k, "steps": steps, "self_ms_per_step": total / 1e3 / steps,
        "gemm_share": sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / total,
        "top_ops": [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                     "share": round(e.self_cpu_time_total / total, 4), "calls_per_step": e.count / steps}
                    for e in events[:top]],
        "loadavg": os.getloadavg(),
    }


def speed_figures(spec, adam, data, repeats, steps, batch_size, loop_models: int = 4) -> dict:
    """Stacked rates at k = 64 and 256, the loop's and the GEMM rate, ``repeats`` interleaved
    runs each; the ratios as the best (ratio of best rates) and the per-run statistics, by
    thread CPU time and by wall clock."""
    runs: dict[str, list[dict]] = {"gemm": [], "stacked64": [], "stacked256": [], "loop": []}
    for _ in range(repeats):
        runs["gemm"].append(gemm_rate())
        runs["stacked64"].append(stacked_rate(spec, adam, data, 64, steps, batch_size))
        runs["stacked256"].append(stacked_rate(spec, adam, data, 256, steps, batch_size))
        runs["loop"].append(loop_rate(spec, adam, data, loop_models, steps, batch_size))
        print({k: {c: round(r, 1) for c, r in v[-1].items()} for k, v in runs.items()}, flush=True)
    flops_per_model_step = 3 * spec.flops_per_sample() * batch_size
    out: dict = {}
    for clock, suffix in (("cpu", ""), ("wall", "_wall")):
        r = {name: [x[clock] for x in xs] for name, xs in runs.items()}

        def ratio(num, den, scale=1.0, r=r):
            per_run = [a * scale / b for a, b in zip(r[num], r[den])]
            return {"best": max(r[num]) * scale / max(r[den]), **stats(per_run)}

        for k in (64, 256):
            out[f"speedup_vs_loop_k{k}{suffix}"] = ratio(f"stacked{k}", "loop")
            out[f"gemm_fraction{'' if k == 64 else '_k256'}{suffix}"] = {
                **ratio(f"stacked{k}", "gemm", flops_per_model_step),
                "gemm_gflops": max(r["gemm"]) / 1e9, "gemm_gflops_median": statistics.median(r["gemm"]) / 1e9}
        out[f"rates_model_steps_per_s{suffix}"] = {n: stats(v) for n, v in r.items() if n != "gemm"}
        out[f"gemm_gflops{suffix}"] = stats([g / 1e9 for g in r["gemm"]])
    out["speed_clock"] = "thread CPU time (time.thread_time); *_wall: wall clock"
    out["speed_loadavg"] = os.getloadavg()
    return out


def threads_figures(spec, adam, data, repeats, steps, batch_size) -> dict:
    """Wall-clock best-of-3 figures with 1 and with 2 torch threads (the GEMM's speed-up
    standing in for a faster BLAS); the rest of this script runs on 1."""
    out = {}
    f = 3 * spec.flops_per_sample() * batch_size
    for threads in (1, 2):
        torch.set_num_threads(threads)
        best: dict[str, float] = {}
        for _ in range(min(repeats, 3)):
            for name, fn in (("gemm", gemm_rate),
                             ("stacked64", lambda: stacked_rate(spec, adam, data, 64, steps, batch_size)),
                             ("stacked256", lambda: stacked_rate(spec, adam, data, 256, steps, batch_size)),
                             ("loop", lambda: loop_rate(spec, adam, data, 4, steps, batch_size))):
                best[name] = max(best.get(name, 0.0), fn()["wall"])
        out[f"threads{threads}"] = {
            "gemm_gflops": best["gemm"] / 1e9,
            "gemm_fraction_k64": best["stacked64"] * f / best["gemm"],
            "gemm_fraction_k256": best["stacked256"] * f / best["gemm"],
            "speedup_vs_loop_k64": best["stacked64"] / best["loop"],
            "speedup_vs_loop_k256": best["stacked256"] / best["loop"],
            "loadavg": os.getloadavg(),
        }
        print(f"threads={threads}", out[f"threads{threads}"], flush=True)
    torch.set_num_threads(1)
    return out


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
    from distcur.stages import datamodel
    from distcur.store import Store

    if store_uri is None:
        from distcur.envs.generation import MetaWorldPriorConfig
        from distcur.stages.ingest import MetaWorldIngestConfig, run_metaworld

        store_uri = tempfile.mkdtemp(prefix="dm-bench-store-")
        run_metaworld(Store(store_uri), MetaWorldIngestConfig(prior=MetaWorldPriorConfig(target=target), heldout_demos=0),
                      progress=False)
    store = Store(store_uri)
    start_ray()
    run = f"bench-datamodel-{int(time.time())}"
    t = time.perf_counter()
    m = datamodel.run(store, DatamodelConfig(estimator="regression"), target, run)
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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per speed measurement (a datamodel trains 300)")
    ap.add_argument("--jobs", type=int, default=2, help="TorchTrainer jobs to time")
    ap.add_argument("--skip-lds", action="store_true")
    ap.add_argument("--only", nargs="+", choices=["speed", "jobs", "metagrad", "lds"], default=None,
                    help="run only these parts (the file keeps the other parts' figures)")
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
    parts = args.only or ["speed", "jobs", "metagrad"] + ([] if args.skip_lds else ["lds"])
    t0 = time.time()
    res: dict = {}
    if "speed" in parts:
        res.update(speed_figures(spec, adam, data, args.repeats, args.steps, cfg.batch_size))
        res["step_profile"] = {f"k{k}": step_profile(spec, adam, data, k, cfg.batch_size) for k in (64, 256)}
        print({k: v["gemm_share"] for k, v in res["step_profile"].items()}, flush=True)
        res["threads2"] = threads_figures(spec, adam, data, args.repeats, args.steps, cfg.batch_size)
    if "jobs" in parts:
        vm = max(stacked_rate(spec, adam, data, 64, args.steps, cfg.batch_size)["wall"] for _ in range(3))
        job_s = torchtrainer_job_seconds(spec, reg.steps, cfg.batch_size, args.jobs)
        job_rate = [reg.steps / s for s in job_s]  # one model per job
        res["speedup_vs_train_job_per_model"] = stats([vm / r for r in job_rate])
        res["train_job_seconds_per_model"] = stats(job_s)
        print("jobs", job_s, flush=True)
    if "metagrad" in parts:
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
    if "lds" in parts:
        info = lds_on_metaworld(args.store, args.target)
        res["lds"] = info["lds"]
        res["lds_run"] = info
    res["inputs"] = {
        "subset_model": {"hidden": list(cfg.hidden), "state_dim": DS, "action_dim": DA, "batch_size": cfg.batch_size},
        "regression": reg.__dict__, "metagrad": mg.__dict__, "timed_steps": args.steps, "repeats": args.repeats,
        "loop_models": 4, "pool_rows": N_POOL, "clusters": N_CLUSTERS, "torch_threads": 1, "train_jobs": args.jobs,
        "parts_of_last_run": parts,
    }
    res["machine"] = {
        "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": machine_facts().get("cpu_model", ""), "torch": torch.__version__, "numpy": np.__version__,
        "blas": [ln.strip() for ln in torch.__config__.show().splitlines() if "BLAS" in ln or "MKL" in ln][:4],
        "loadavg_at_end": os.getloadavg(),
    }
    res["wall_s"] = time.time() - t0
    update_result("datamodels", res)
    print(json.dumps({k: (v.get("best", v.get("median")) if isinstance(v, dict) else v) for k, v in res.items()
                      if k in ("speedup_vs_loop_k64", "speedup_vs_loop_k256", "speedup_vs_train_job_per_model",
                               "gemm_fraction", "gemm_fraction_k256", "metagrad_cost_ratio",
                               "metagrad_peak_mem_ratio", "metagrad_fd_rel_err", "lds")}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
