"""Exact log-KDE speed (docs/benchmarks.md): distcur vs scipy, sklearn, plain numpy and the bare GEMM.

N query points under M reference points in d dims, Gaussian kernel with covariance h^2 * Sigma
(scipy's rule; h = Scott's factor). Every ratio is taken inside one repetition, so machine load
shared by the peers of that repetition cancels; the JSON reports median/min/max over repetitions.

- distcur: :func:`distcur.score.kde.log_kde` on all N queries (whitening included).
- gemm: bare float32 matmul of the distance GEMM's shapes, (n x d) @ (d x M), blockwise into a
  reused output (the full N x M output would be 16 GB); the fastest of numpy / torch and of several
  query-block sizes is the reference, so gemm_fraction is conservative.
- scipy ``gaussian_kde.logpdf``, sklearn ``KernelDensity(rtol=0, atol=0)`` on whitened points,
  plain numpy (float64, blockwise, scipy logsumexp): timed on a subset of the queries, scaled linearly.

Ray Data vs task grid (``ray_data_kde_overhead``): wall time of the whole IWR stage
(:func:`distcur.stages.score.run_iwr`, exact mode, N prior x N prior log-KDE plus the target KDE) with
``executor="ray-data"`` over ``executor="tasks"`` at N = 200k prior steps (d = 16, a 2000-step target,
default shards), runs in the order tasks, ray-data, ray-data, tasks, ... so drifting load cancels;
each run's scores table must equal the first task-grid run's.

Usage: python benchmarks/bench_kde.py [--queries 200000] [--refs 20000] [--dims 16 64] [--repeats 3]
       [--parts kernel ray-data]   (a part run alone updates only its keys of kde.json)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy
import scipy.stats as st
import sklearn
import torch
from scipy.special import logsumexp
from sklearn.neighbors import KernelDensity

from distcur.score._fastexp import exp2_row_sums
from distcur.score.kde import (
    BLOCK_QUERIES,
    BLOCK_REFS,
    log_kde,
    log_kde_partial_sums,
    scott_factor,
    whitening,
)

RESULTS = Path(__file__).parent / "results" / "kde.json"


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def bare_gemm_pairs_per_s(q: np.ndarray, r: np.ndarray) -> tuple[float, str, dict[str, float]]:
    """Fastest float32 GEMM rate (pairs/s) of (n x d) @ (d x M), blockwise into a reused output."""
    best, which, rates = 0.0, "", {}
    rt_np = np.ascontiguousarray(r.T)
    qt, rt_t = torch.from_numpy(q), torch.from_numpy(rt_np)
    for bq in (1024, 4096):
        for lib in ("numpy", "torch"):
            out_np = np.empty((bq, len(r)), np.float32)
            out_t = torch.from_numpy(out_np)
            t = time.perf_counter()
            for i in range(0, len(q) - bq + 1, bq):
                if lib == "numpy":
                    np.matmul(q[i : i + bq], rt_np, out=out_np)
                else:
                    torch.mm(qt[i : i + bq], rt_t, out=out_t)
            rate = (len(q) // bq) * bq * len(r) / (time.perf_counter() - t)
            rates[f"{lib}_query_block_{bq}"] = rate
            if rate > best:
                best, which = rate, f"{lib}, query block {bq} x {len(r)}"
    # Our own scheme too: one Python thread per core, single-threaded torch, blocks of the KDE's shape
    # (and of the shape it used before, 256 x 1024: the fastest of them is the reference).
    threads = torch.get_num_threads()
    for bq, bk in sorted({(BLOCK_QUERIES, BLOCK_REFS), (256, 1024)}):
        blocks = [rt_t[:, j : j + bk].contiguous() for j in range(0, len(r) - bk + 1, bk)]
        starts = list(range(0, len(q) - bq + 1, bq))

        def run(mine: list[int], bq=bq, blocks=blocks) -> None:
            out_t = torch.empty(bq, blocks[0].shape[1])
            for i in mine:
                for b in blocks:
                    torch.mm(qt[i : i + bq], b, out=out_t)

        torch.set_num_threads(1)
        try:
            t = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, [starts[k::threads] for k in range(threads)]))
            rate = len(starts) * bq * len(blocks) * bk / (time.perf_counter() - t)
        finally:
            torch.set_num_threads(threads)
        rates[f"torch_{threads}_threads_block_{bq}x{bk}"] = rate
        if rate > best:
            best, which = rate, f"torch, {threads} threads x block {bq} x {bk}"
    return best, which, rates


def best_time(fn, repeats: int = 50) -> float:
    """Fastest of ``repeats`` timings of ``fn()``: on a shared machine the minimum is the run no other
    process interrupted, the closest a loaded machine gets to an idle one's figure."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def op_profile(q: np.ndarray, r: np.ndarray, h: float) -> dict:
    """Time of each op of the log-KDE, single-threaded, in ns per query x reference pair.

    Every op is timed alone on the KDE's block shape, fastest of many calls of ~50-150 us each (so
    that some run uninterrupted even on a loaded machine): the GEMM of one block, the fused exp
    kernel, the first block's row maxima (the shift, once per query block: spread over the reference
    blocks), the Python of one block (GEMM + kernel called back to back, less the two), the
    per-query-block setup (one 512 x 512 call of :func:`log_kde_partial_sums` less its GEMM, kernel
    and shift) and the whitening, both spread over the ``len(r)`` references. Their sum predicts the
    single-threaded GEMM fraction of an uninterrupted machine, ``predicted_gemm_fraction_1_thread``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        white = whitening(r, "refs")
        bq, br = BLOCK_QUERIES, BLOCK_REFS
        yq, yr = white.apply(q[:bq]), white.apply(r[:br])
        m, d = len(r), q.shape[1]
        qi, rt = torch.from_numpy(yq), torch.from_numpy(np.ascontiguousarray(yr.T))
        col = np.zeros(br, np.float32)
        buf = torch.empty(bq, br)
        shift, tot = np.zeros(bq, np.float32), np.zeros(bq)
        pairs = bq * br

        def gemm_exp():
            torch.mm(qi, rt, out=buf)
            exp2_row_sums(buf.numpy(), col, shift, tot)

        one_block = lambda: log_kde_partial_sums(yq, yr, h, threads=1)  # noqa: E731
        one_block()
        ns = lambda fn: best_time(fn, 300) / pairs * 1e9  # noqa: E731
        out = {"block": [bq, br], "refs": m, "dim": d,
               "gemm": ns(lambda: torch.mm(qi, rt, out=buf)),
               "exp_kernel": ns(lambda: exp2_row_sums(buf.numpy(), col, shift, tot)),
               "shift_once_per_query_block": ns(lambda: (buf + torch.from_numpy(col)).amax(1))}
        out["python_per_block"] = max(0.0, ns(gemm_exp) - out["gemm"] - out["exp_kernel"])
        block_call = ns(one_block) - out["gemm"] - out["exp_kernel"] - out["shift_once_per_query_block"]
        spread = br / m  # per-query-block costs over all M references
        out["setup_per_query_block_spread"] = max(0.0, block_call) * spread
        nw = min(len(q), 8 * bq)  # per query, at a size where its memory traffic shows
        out["whitening_spread"] = best_time(lambda: white.apply(q[:nw]), 100) / (nw * m) * 1e9
        out["shift_spread"] = out["shift_once_per_query_block"] * spread
        total = (out["gemm"] + out["exp_kernel"] + out["python_per_block"] + out["shift_spread"]
                 + out["setup_per_query_block_spread"] + out["whitening_spread"])
        out["total"] = total
        out["gemm_gflops_1_thread"] = 2 * d / out["gemm"]
        out["predicted_gemm_fraction_1_thread"] = out["gemm"] / total
        return out
    finally:
        torch.set_num_threads(threads)


def numpy_log_kde(q: np.ndarray, r: np.ndarray, h: float, white) -> np.ndarray:
    """Plain numpy: whiten, float64 blockwise squared distances, scipy logsumexp."""
    yq, yr = white.apply(q).astype(np.float64), white.apply(r).astype(np.float64)
    rr = (yr * yr).sum(1)
    out = np.empty(len(q))
    for i in range(0, len(q), 1024):
        b = yq[i : i + 1024]
        d2 = (b * b).sum(1)[:, None] + rr[None] - 2 * b @ yr.T
        out[i : i + 1024] = logsumexp(-d2 / (2 * h * h), axis=1)
    d = q.shape[1]
    return out - np.log(len(r)) - 0.5 * d * np.log(2 * np.pi * h * h) - white.log_det


def one_repetition(q, r, h, subsets, rep) -> dict:
    n, m, d = len(q), len(r), q.shape[1]
    white = whitening(r, "refs")
    # The GEMM is timed right before and right after distcur (the load on a shared machine drifts):
    # each candidate's rate is the mean of the two, the reference the fastest candidate.
    _, _, before = bare_gemm_pairs_per_s(q[: subsets["gemm"]], white.apply(r))
    t_ours, ours = timed(log_kde, q, r, h)
    _, _, after = bare_gemm_pairs_per_s(q[: subsets["gemm"]], white.apply(r))
    gemm_rates = {k: (before[k] + after[k]) / 2 for k in before}
    gemm_kind = max(gemm_rates, key=gemm_rates.get)
    gemm_rate = gemm_rates[gemm_kind]
    rate_ours = n * m / t_ours

    ns = subsets["scipy"]
    kde = st.gaussian_kde(r.T.astype(np.float64), bw_method=h)
    t_scipy, ref = timed(kde.logpdf, q[:ns].T.astype(np.float64))
    nk = subsets["sklearn"]
    yq, yr = white.apply(q[:nk]).astype(np.float64), white.apply(r).astype(np.float64)
    skl = KernelDensity(kernel="gaussian", bandwidth=h, rtol=0, atol=0).fit(yr)
    t_skl, skl_out = timed(skl.score_samples, yq)
    skl_out = skl_out - white.log_det  # sklearn's density is in whitened coordinates
    nn = subsets["numpy"]
    t_np, np_out = timed(numpy_log_kde, q[:nn], r, h, white)

    rate = {
        "distcur": rate_ours,
        "gemm_float32": gemm_rate,
        "scipy": ns * m / t_scipy,
        "sklearn": nk * m / t_skl,
        "numpy": nn * m / t_np,
    }
    rel = lambda a, b: float(np.max(np.abs(a - b) / np.abs(b)))  # noqa: E731
    out = {
        "repetition": rep,
        "gemm_gflops": gemm_rate * 2 * d / 1e9,
        "pairs_per_s": rate,
        "seconds_full_N": {k: n * m / v for k, v in rate.items()},
        "gemm_reference": gemm_kind,
        "gemm_fraction": rate_ours / gemm_rate,
        "gemm_fraction_vs_numpy_matmul": rate_ours / max(v for k, v in gemm_rates.items() if k.startswith("numpy")),
        "gemm_candidates_pairs_per_s": gemm_rates,
        "gemm_candidates_before_after": {k: [before[k], after[k]] for k in before},
        "speedup_vs_scipy": rate_ours / rate["scipy"],
        "speedup_vs_sklearn": rate_ours / rate["sklearn"],
        "speedup_vs_numpy": rate_ours / rate["numpy"],
        "max_rel_err_vs_scipy": rel(ours[:ns], ref),
        "max_rel_err_sklearn_vs_scipy": rel(skl_out[: min(nk, ns)], ref[: min(nk, ns)]),
        "max_rel_err_numpy_vs_scipy": rel(np_out[: min(nn, ns)], ref[: min(nn, ns)]),
    }
    print(json.dumps({"d": d, **{k: v for k, v in out.items() if k not in ("seconds_full_N", "pairs_per_s")}}),
          flush=True)
    return out


def summarise(runs: list[dict]) -> dict:
    keys = ["gemm_fraction", "gemm_gflops", "gemm_fraction_vs_numpy_matmul", "speedup_vs_scipy", "speedup_vs_sklearn",
            "speedup_vs_numpy"]
    summary: dict = {k: statistics.median(r[k] for r in runs) for k in keys}
    summary["spread"] = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                             "max": max(r[k] for r in runs)} for k in keys}
    summary["pairs_per_s_median"] = {k: statistics.median(r["pairs_per_s"][k] for r in runs)
                                     for k in runs[0]["pairs_per_s"]}
    summary["max_rel_err_vs_scipy"] = max(r["max_rel_err_vs_scipy"] for r in runs)
    summary["runs"] = runs
    return summary


def kde_inputs(d: int, args) -> tuple[np.ndarray, np.ndarray, float]:
    """(queries, refs, Scott's h) of dimension ``d``, seed 0 (``inputs.data`` of the results)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    q = (rng.normal(size=(args.queries, d)) @ a.T).astype(np.float32)
    r = (rng.normal(size=(args.refs, d)) @ a.T + 0.1).astype(np.float32)
    return q, r, scott_factor(args.refs, d)


def machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": sys.version.split()[0],
        "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
        "sklearn": sklearn.__version__, "platform": platform.platform(), "loadavg": load,
    }


def write(path: Path, result: dict) -> None:
    """Update ``path`` with ``result``'s keys, atomically; keys it does not name (another part's) are kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**old, **result}, indent=2) + "\n")
    os.replace(tmp, path)


def ray_data_overhead(n: int, d: int, n_target: int, pairs: int, num_shards: int | None) -> dict:
    """Wall time of IWR (exact) on the Ray Data executor over the task grid, ``pairs`` ABBA pairs of runs."""
    import tempfile

    import pyarrow as pa

    sys.path.insert(0, str(Path(__file__).parent))
    from iwr_kernels import embedding_table

    from distcur.data import embeddings_key
    from distcur.distributed.session import ensure_ray
    from distcur.methods import IwrConfig
    from distcur.stages.score import run_iwr
    from distcur.store import Store

    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    steps = 50
    prior = (rng.normal(size=(n, d)) @ a.T).reshape(n // steps, steps, d)
    target = (rng.normal(size=(n_target, d)) * 0.5 @ a.T + 0.5).reshape(n_target // steps, steps, d)
    import ray

    ensure_ray(num_cpus=os.cpu_count())
    walls: dict[str, list[float]] = {"tasks": [], "ray-data": []}
    runs = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stack.callback(ray.shutdown)
        store = Store(tmp)
        prior_key, target_key = embeddings_key("bench", "prior"), embeddings_key("bench", "target")
        store.write_table(prior_key, embedding_table(prior, "prior"), stage="embed", rows_per_part=50_000)
        store.write_table(target_key, embedding_table(target, "target"), stage="embed")
        small_key = embeddings_key("bench", "small")
        store.write_table(small_key, embedding_table(prior[:40], "small"), stage="embed")
        cold = {}
        for executor in walls:  # warm-up: worker processes, Ray Data's executor, the numba kernel's cache
            t = time.perf_counter()
            run_iwr(store, [small_key], target_key, f"scores/warm-{executor}",
                    IwrConfig(num_shards=2, executor=executor))
            cold[executor] = time.perf_counter() - t
        reference: pa.Table | None = None
        order = [e for _ in range(pairs) for e in ("tasks", "ray-data", "ray-data", "tasks")][: 2 * pairs]
        for i, executor in enumerate(order):
            key = f"scores/{executor}-{i}"
            load = os.getloadavg()
            t = time.perf_counter()
            m = run_iwr(store, [prior_key], target_key, key, IwrConfig(num_shards=num_shards, executor=executor))
            wall = time.perf_counter() - t
            table = store.read_table(key).sort_by([("source", "ascending"), ("episode", "ascending"),
                                                   ("step", "ascending")])
            reference = table if reference is None else reference
            walls[executor].append(wall)
            runs.append({"executor": executor, "wall_s": wall, "compute_s": m.metadata["compute_s"],
                         "num_shards": m.metadata["num_shards"], "scores_equal_first_task_grid": table.equals(reference),
                         "loadavg_before": load, "loadavg_after": os.getloadavg()})
            print(json.dumps(runs[-1]), flush=True)
    return {
        "ray_data_kde_overhead": sum(walls["ray-data"]) / sum(walls["tasks"]),
        "ray_data_kde": {
            "what": "wall of run_iwr(executor='ray-data') / run_iwr(executor='tasks'), exact IWR, sums over the runs",
            "prior_steps": n, "target_steps": n_target, "dim": d, "num_shards": runs[0]["num_shards"],
            "ray_cpus": os.cpu_count(), "order": order,
            "overhead_per_pair": [rd / tg for tg, rd in zip(walls["tasks"], walls["ray-data"], strict=True)],
            "wall_s": walls,
            "first_use_wall_s": {"what": f"the warm-up run ({len(prior[:40]) * steps} prior steps), tasks first: "
                                         "a Ray session's first use of each executor", **cold},
            "scores_equal": all(r["scores_equal_first_task_grid"] for r in runs), "runs": runs,
            "goal": "<= 1.15",
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=200_000)
    p.add_argument("--refs", type=int, default=20_000)
    p.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--scipy-queries", type=int, default=2000)
    p.add_argument("--sklearn-queries", type=int, default=1000)
    p.add_argument("--numpy-queries", type=int, default=10_000)
    p.add_argument("--gemm-queries", type=int, default=16_384)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--parts", nargs="+", choices=("kernel", "ray-data", "ops"), default=["kernel", "ray-data"],
                   help="kernel: the log-KDE vs scipy / sklearn / numpy / GEMM (with each d's op profile); "
                        "ray-data: ray_data_kde_overhead; ops: the op profiles alone (op_profile_ns_per_pair)")
    p.add_argument("--ray-data-prior", type=int, default=200_000, help="ray-data: prior steps N")
    p.add_argument("--ray-data-pairs", type=int, default=2, help="ray-data: (task grid, Ray Data) run pairs")
    p.add_argument("--ray-data-shards", type=int, default=None, help="ray-data: shards (default: run_iwr's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    subsets = {"scipy": args.scipy_queries, "sklearn": args.sklearn_queries, "numpy": args.numpy_queries,
               "gemm": args.gemm_queries}
    subsets = {k: min(v, args.queries) for k, v in subsets.items()}
    result: dict = {
        "inputs": {"queries": args.queries, "refs": args.refs, "dims": args.dims, "repeats": args.repeats,
                   "data": "queries and refs ~ N(0, A A^T) with a random A (seed 0), refs shifted by 0.1",
                   "bandwidth": "Scott's factor M^(-1/(d+4)), kernel covariance h^2 * sample covariance (ddof=1)",
                   "peer_query_subsets": subsets, "block": [BLOCK_QUERIES, BLOCK_REFS]},
        "machine_before": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "ray-data" in args.parts:
        overhead = ray_data_overhead(args.ray_data_prior, 16, 2000, args.ray_data_pairs, args.ray_data_shards)
        overhead["ray_data_kde"]["machine_before"] = result["machine_before"]
        overhead["ray_data_kde"]["machine_after"] = machine()
        write(args.out, overhead)
    if "ops" in args.parts:  # robust on a loaded machine: every op timed alone, fastest of many short calls
        profiles = {"machine": machine(), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for d in args.dims:
            q, r, h = kde_inputs(d, args)
            profiles[f"d{d}"] = op_profile(q, r, h)
            print(json.dumps({"d": d, "op_profile_ns_per_pair": profiles[f"d{d}"]}), flush=True)
        write(args.out, {"op_profile_ns_per_pair": profiles})
    if "kernel" not in args.parts:
        print(f"wrote {args.out}")
        return 0
    for d in args.dims:
        q, r, h = kde_inputs(d, args)
        runs = []
        profile = op_profile(q, r, h)
        print(json.dumps({"d": d, "op_profile_ns_per_pair": profile}), flush=True)
        for rep in range(args.repeats):
            runs.append(one_repetition(q, r, h, subsets, rep))
            result[f"d{d}"] = {"bandwidth": h, "repetitions_done": len(runs), **summarise(runs),
                               "op_profile_ns_per_pair": profile}
            write(args.out, result)  # a partial result survives an interrupted run
    result["machine_after"] = machine()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
