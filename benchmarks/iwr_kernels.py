"""IWR kernels compared: ``kernel="per-set"`` (two scipy-style KDEs) vs ``"shared-prior"`` whitening.

On a generated embedding set shaped like a multi-task prior: ``--tasks`` tasks, each a Gaussian
of its own mean and covariance, ``--episodes`` episodes per task of ``--steps`` autocorrelated
steps (AR(1), rho 0.95), in ``--dim`` dims (the VAE's latent size). The target is
``--target-episodes`` episodes of task 0's process, slightly shifted; task 0's prior episodes are
the ones a retrieval should find. For each seed both kernels score the same prior with
:func:`distcur.stages.score.run_iwr` (exact mode, Ray, Scott's rule unless ``--bandwidth``), and the
script reports per seed and as median/min/max over seeds:

- agreement of the two score vectors: Spearman over prior steps, overlap of the top 10% of steps
  and of the top 10% of episodes (by mean step score);
- recall of task 0's prior steps in each kernel's top 10% of steps, and in its top ``r`` steps
  with ``r`` the number of task 0's prior steps (= precision there);
- wall time of each run_iwr call (``--repeats`` per kernel and seed, in alternating order, after
  one untimed call that starts Ray's workers) and its manifest's compute_s.

Synthetic data only: it shows how far the two estimators differ and what each costs, not which
one picks better data for a policy (that is the benchmark protocol's job).

Usage: python benchmarks/iwr_kernels.py [--seeds 0 1 2] [--tasks 20] [--episodes 25] [--steps 100]
writes benchmarks/results/iwr_kernels.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import summarize, write_result  # noqa: E402

from distcur.data import embeddings_key  # noqa: E402
from distcur.methods import IwrConfig  # noqa: E402
from distcur.schema import EMBEDDING_SCHEMA  # noqa: E402
from distcur.score.iwr import KERNELS  # noqa: E402
from distcur.stages.score import run_iwr  # noqa: E402
from distcur.store import Store  # noqa: E402

RHO = 0.95  # step-to-step autocorrelation of the latent process within an episode
TARGET_SHIFT = 0.2  # target mean = task 0's mean + this, in every dim
TOP = 0.10


def episodes_of(rng, mean: np.ndarray, shape: np.ndarray, episodes: int, steps: int) -> np.ndarray:
    """[episodes, steps, d] AR(1) trajectories with stationary law N(mean, shape shape^T)."""
    a = np.empty((episodes, steps, len(mean)))
    a[:, 0] = rng.normal(size=(episodes, len(mean)))
    for t in range(1, steps):
        a[:, t] = RHO * a[:, t - 1] + np.sqrt(1 - RHO**2) * rng.normal(size=(episodes, len(mean)))
    return mean + a @ shape.T


def embedding_table(z: np.ndarray, source: str) -> pa.Table:
    """EMBEDDING_SCHEMA table of z [episodes, steps, d]."""
    e, t, d = z.shape
    flat = pa.array(np.ascontiguousarray(z, dtype=np.float32).ravel())
    offsets = pa.array(np.arange(0, e * t * d + 1, d, dtype=np.int32))
    return pa.Table.from_arrays(
        [pa.array([source] * (e * t)), pa.array(np.repeat(np.arange(e), t), pa.int64()),
         pa.array(np.tile(np.arange(t), e), pa.int32()), pa.ListArray.from_arrays(offsets, flat)],
        schema=EMBEDDING_SCHEMA)


def generate(store: Store, seed: int, args) -> tuple[list[str], str]:
    """Write one prior table per task and the target table; returns (prior keys, target key)."""
    rng = np.random.default_rng(seed)
    d = args.dim
    means = rng.normal(size=(args.tasks, d)) * 2.0
    shapes = [rng.normal(size=(d, d)) / np.sqrt(d) * rng.uniform(0.3, 1.0) for _ in range(args.tasks)]
    keys = []
    for k in range(args.tasks):
        key = embeddings_key("bench", f"task{k:02d}")
        store.write_table(key, embedding_table(episodes_of(rng, means[k], shapes[k], args.episodes, args.steps),
                                               f"task{k:02d}"), stage="embed")
        keys.append(key)
    target = episodes_of(rng, means[0] + TARGET_SHIFT, shapes[0], args.target_episodes, args.steps)
    target_key = embeddings_key("bench", "target")
    store.write_table(target_key, embedding_table(target, "target"), stage="embed")
    return keys, target_key


def top(x: np.ndarray, share: float) -> np.ndarray:
    return np.argsort(-x, kind="stable")[: max(1, round(share * len(x)))]


def overlap(a: np.ndarray, b: np.ndarray, share: float) -> float:
    ta, tb = top(a, share), top(b, share)
    return len(np.intersect1d(ta, tb)) / len(ta)


def one_seed(seed: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="iwr-kernels-") as root:
        store = Store(root)
        keys, target_key = generate(store, seed, args)
        scores, runs = {}, {k: {"wall_s": [], "compute_s": []} for k in KERNELS}
        run_iwr(store, keys, target_key, "scores/warm-up", IwrConfig(num_shards=args.num_shards))  # Ray workers started
        for r in range(args.repeats):
            for kernel in KERNELS if r % 2 == 0 else KERNELS[::-1]:
                t = time.perf_counter()
                m = run_iwr(store, keys, target_key, f"scores/{kernel}-{r}",
                            IwrConfig(bandwidth=args.bandwidth, kernel=kernel, num_shards=args.num_shards))
                runs[kernel]["wall_s"].append(round(time.perf_counter() - t, 3))
                runs[kernel]["compute_s"].append(m.metadata["compute_s"])
                runs[kernel].update(h_target=m.metadata["bandwidth"]["h_target"],
                                    h_prior=m.metadata["bandwidth"]["h_prior"])
        for kernel in KERNELS:
            table = store.read_table(f"scores/{kernel}-0").sort_by(
                [("source", "ascending"), ("episode", "ascending"), ("step", "ascending")])
            scores[kernel] = table.column("score").to_numpy()
        source = table.column("source").to_numpy(zero_copy_only=False)
        episode_id = np.char.add(np.char.add(source.astype(str), "/"), table.column("episode").to_numpy().astype(str))
        related = source == "task00"
    per_set, shared = scores["per-set"], scores["shared-prior"]
    _, inverse = np.unique(episode_id, return_inverse=True)
    ep_mean = {k: np.bincount(inverse, v) / np.bincount(inverse) for k, v in scores.items()}
    out = {
        "seed": seed,
        "prior_steps": len(per_set),
        "spearman_steps": float(spearmanr(per_set, shared).statistic),
        "top10_overlap_steps": overlap(per_set, shared, TOP),
        "top10_overlap_episodes": overlap(ep_mean["per-set"], ep_mean["shared-prior"], TOP),
        "related_recall_top10_steps": {k: float(np.isin(np.flatnonzero(related), top(v, TOP)).mean())
                                       for k, v in scores.items()},
        "related_recall_at_its_size": {k: float(np.isin(np.flatnonzero(related), top(v, related.mean())).mean())
                                       for k, v in scores.items()},
        "runs": runs,
    }
    print({k: v for k, v in out.items() if k != "runs"}, runs, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--episodes", type=int, default=25, help="prior episodes per task")
    p.add_argument("--steps", type=int, default=100, help="steps per episode")
    p.add_argument("--target-episodes", type=int, default=10)
    p.add_argument("--dim", type=int, default=14)
    p.add_argument("--bandwidth", default="scott")
    p.add_argument("--num-shards", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed run_iwr calls per kernel and seed")
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        per_seed = [one_seed(s, args) for s in args.seeds]
    finally:
        ray.shutdown()
    keys = ("spearman_steps", "top10_overlap_steps", "top10_overlap_episodes")
    summary = {k: summarize([r[k] for r in per_seed]) for k in keys}
    for kernel in KERNELS:
        for key in ("related_recall_top10_steps", "related_recall_at_its_size"):
            summary[f"{key}_{kernel}"] = summarize([r[key][kernel] for r in per_seed])
        summary[f"wall_s_{kernel}"] = summarize([w for r in per_seed for w in r["runs"][kernel]["wall_s"]])
    path = write_result("iwr_kernels", {"about": __doc__.split("\n\n")[0], "inputs": vars(args),
                                        "data": {"rho": RHO, "target_shift": TARGET_SHIFT, "top_share": TOP},
                                        "summary": summary, "per_seed": per_seed})
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
