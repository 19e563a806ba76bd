"""DataMIL's meta-gradient iterations over one TorchTrainer's workers, each committed as it finishes.

The maths is :mod:`distcur.datamodels.metagrad`; this is the glue of the ``ray-train`` executor.
Iteration i of fold f commits its meta-gradients, (cluster, score) per cluster, as its own table
``datamodels/<run>/metagrad/fold=<f>/iter=<i>``, with its config (the run config, the candidate
set, the training pool, a fingerprint of the training arrays); that manifest is its done bit, so a
rerun (or a restarted worker group) redoes only the missing iterations.

* ``distcur`` recipe: the iterations are independent given their candidate sets (a pure
  function of the seed): all of them are one round, spread over the workers (worker ``rank``
  takes iterations ``rank::num_workers``).
* ``datamil`` recipe (the reference's training pool): the pool that iteration i trains on
  depends on the earlier iterations' scores (the percentile moves of
  :func:`~distcur.datamodels.metagrad.update_pool`), so the iterations run in rounds of
  ``round_size``: a round's iterations all train on the pool left by the earlier rounds and run
  in parallel; after the round (``ray.train.report`` is the barrier) every worker reads the
  round's committed scores and applies their pool moves in iteration order
  (:func:`~distcur.datamodels.metagrad.round_pools`). ``round_size`` 1 is the reference's
  sequence (no parallelism); the serial driver loop with the same ``round_size`` gives the same
  numbers.

The meta-gradients run on the workers' CPUs (``cpus_per_worker`` torch threads each).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distcur.datamodels.metagrad import (
    MetagradRunConfig,
    candidate_sets,
    combine_distcur,
    combine_reference,
    metagrad_iteration,
    round_pools,
)
from distcur.datamodels.subsets import SubsetTrainingData
from distcur.distributed.raytrain import RayTrainSettings, fit_items, run_share, worker_device
from distcur.policy.functional import AdamConfig, PolicySpec
from distcur.store import Store

log = logging.getLogger(__name__)

ITERATION_STAGE = "datamodel-metagrad-iteration"
ITERATION_SCHEMA = pa.schema([pa.field("cluster", pa.int64(), nullable=False),
                              pa.field("score", pa.float64(), nullable=False)])


def iteration_key(run: str, fold: int, it: int) -> str:
    return f"datamodels/{run}/metagrad/fold={fold}/iter={it:05d}"


def _bits_fingerprint(x: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.asarray(x, bool)).tobytes()).hexdigest()[:16]


def data_fingerprint(data: SubsetTrainingData) -> str:
    """sha256 of the training and proxy arrays (what the cluster level, horizon, injection and
    normalisation made of the inputs)."""
    h = hashlib.sha256()
    for a in (data.obs, data.act, data.group, data.proxy_obs, data.proxy_act):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(str(data.n_clusters).encode())
    return h.hexdigest()[:16]


@dataclass
class MetagradFold:
    """One fold's meta-gradient iterations: its arrays, policy, optimiser and run config."""

    fold: int
    data: SubsetTrainingData
    spec: PolicySpec
    adam: AdamConfig
    run_cfg: MetagradRunConfig
    proxy: str
    round_size: int = 1  # datamil recipe: iterations per round (distcur: every iteration is one round)

    def rounds(self) -> list[range]:
        n = self.run_cfg.iterations
        size = n if self.run_cfg.recipe == "distcur" else self.round_size
        return [range(lo, min(lo + size, n)) for lo in range(0, n, size)]

    def iteration_config(self, it: int, candidates: np.ndarray, pool: np.ndarray | None, data_fp: str) -> dict:
        return {"fold": self.fold, "iteration": it, "run": dataclasses.asdict(self.run_cfg),
                "spec": {"hidden": list(self.spec.hidden), "state_dim": self.spec.state_dim,
                         "action_dim": self.spec.action_dim},
                "adam": dataclasses.asdict(self.adam), "proxy": self.proxy, "round_size": self.round_size,
                "candidates": _bits_fingerprint(candidates),
                "pool": None if pool is None else _bits_fingerprint(pool), "data": data_fp}


class _FoldState:
    """What the store holds of one fold: the committed scores, walked round by round (a datamil
    round's pool is known only once every earlier round is committed)."""

    def __init__(self, store: Store, run: str, job: MetagradFold, inputs: dict[str, str], data_fp: str):
        self.store, self.run, self.job, self.inputs, self.data_fp = store, run, job, inputs, data_fp
        self.candidate_sets = candidate_sets(job.data.n_clusters, job.run_cfg)

    def pool(self, scores: list[np.ndarray], it: int) -> np.ndarray | None:
        if self.job.run_cfg.recipe == "distcur":
            return None
        return round_pools(scores, self.job.data.n_clusters, self.job.run_cfg, self.job.round_size)[0][it]

    def config(self, scores: list[np.ndarray], it: int) -> dict:
        return self.job.iteration_config(it, self.candidate_sets[it], self.pool(scores, it), self.data_fp)

    def is_done(self, scores: list[np.ndarray], it: int) -> bool:
        return self.store.is_done(iteration_key(self.run, self.job.fold, it), ITERATION_STAGE,
                                  self.config(scores, it), self.inputs)

    def read(self, it: int) -> np.ndarray:
        t = self.store.read_table(iteration_key(self.run, self.job.fold, it))
        out = np.zeros(self.job.data.n_clusters)
        out[t.column("cluster").to_numpy()] = t.column("score").to_numpy()
        return out

    def committed(self) -> tuple[list[np.ndarray], int]:
        """(the scores of every iteration before the first incomplete round, how many iterations
        are committed in all); for the distcur recipe the single round may be partly done."""
        scores: list[np.ndarray] = []
        done = 0
        for rnd in self.job.rounds():
            flags = [self.is_done(scores, it) for it in rnd]
            done += sum(flags)
            if not all(flags):
                break
            scores += [self.read(it) for it in rnd]
        return scores, done


def _run_fold(store: Store, run: str, inputs: dict[str, str], job: MetagradFold, data_fp: str,
              fault_marker: str | None) -> None:
    """Inside a worker: one fold's rounds in order, this worker's share of each round."""
    import torch

    from distcur.policy.proxy import make_proxy_fn

    state = _FoldState(store, run, job, inputs, data_fp)
    d = job.data
    obs, act = torch.as_tensor(d.obs), torch.as_tensor(d.act)
    proxy_fn = make_proxy_fn(job.spec, torch.as_tensor(d.proxy_obs), torch.as_tensor(d.proxy_act), job.proxy)
    scores: list[np.ndarray] = []  # the committed rounds' scores, in iteration order

    def work(it: int) -> None:
        candidates = state.candidate_sets[it]
        s = metagrad_iteration(job.spec, job.adam, obs, act, d.group, d.n_clusters, proxy_fn, job.run_cfg, it,
                               candidates, state.pool(scores, it))
        # the candidates' entries are the scores (the datamil recipe's are 0 elsewhere anyway)
        table = pa.Table.from_pydict({"cluster": np.flatnonzero(candidates).astype(np.int64), "score": s[candidates]},
                                     schema=ITERATION_SCHEMA)
        store.write_table(iteration_key(run, job.fold, it), table, stage=ITERATION_STAGE,
                          config=state.config(scores, it), inputs=inputs)

    for rnd in job.rounds():
        run_share(list(rnd), lambda it: state.is_done(scores, it), work, fault_marker)
        # every worker has passed the round's last report (a barrier): the round is committed
        scores.extend(state.read(it) for it in rnd)


def _metagrad_worker(config: dict) -> None:
    """``train_loop_per_worker``: every fold in order (the fault marker applies to fold 0)."""
    import ray

    worker_device(config["threads"])
    for job, data_fp in zip(ray.get(config["jobs"]), config["data_fps"]):
        _run_fold(config["store"], config["run"], config["inputs"], job, data_fp,
                  config["fault_marker"] if job.fold == 0 else None)


class MetagradFailed(RuntimeError):
    """Some iterations are not committed; the committed ones are kept, a rerun does the rest."""


def run_metagrad_iterations(store: Store, run: str, jobs: list[MetagradFold], inputs: dict[str, str],
                            settings: RayTrainSettings | None = None, address: str | None = None,
                            progress=None, fault_marker: str | None = None
                            ) -> list[tuple[np.ndarray, np.ndarray, list[int] | None]]:
    """Every fold's iterations under one TorchTrainer (skipped when all are committed); returns per
    fold (score (C,), count (C,), pool sizes per iteration or None for the distcur recipe), the
    numbers of :func:`~distcur.datamodels.metagrad.datamil_metagrad_scores` /
    :func:`~distcur.datamodels.metagrad.datamil_reference_scores` (with the same ``round_size``).

    ``progress``: a bar moved as iterations commit. ``fault_marker``: a file listing fold-0
    iterations at which a worker dies once (tests)."""
    import ray

    from distcur.distributed.session import ensure_ray

    settings = settings or RayTrainSettings()
    fps = [data_fingerprint(j.data) for j in jobs]
    states = [_FoldState(store, run, j, inputs, fp) for j, fp in zip(jobs, fps)]
    total = sum(j.run_cfg.iterations for j in jobs)

    def committed() -> int:
        return sum(s.committed()[1] for s in states)

    done = committed()
    log.info("meta-gradient %s: %d of %d iterations committed", run, done, total)
    seen = [done]
    if progress is not None and done:
        progress.update(done)

    def poll() -> None:
        n = committed()
        if progress is not None and n > seen[0]:
            progress.update(n - seen[0])
            seen[0] = n

    if done < total:
        ensure_ray(address)
        config = {"store": store, "run": run, "inputs": inputs, "jobs": ray.put(jobs), "data_fps": fps,
                  "threads": settings.cpus_per_worker, "fault_marker": fault_marker}
        error = None
        try:
            fit_items(_metagrad_worker, config, settings, store.uri_of(f"datamodels/{run}/ray"),
                      "datamodel-metagrad", poll)
        except Exception as e:  # the trainer's error after its restarts: say what is missing
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        missing = total - committed()
        if missing:
            raise MetagradFailed(f"meta-gradient {run}: {missing} of {total} iterations are not committed "
                                 f"({error or 'Ray Train finished without them'}); the others are under "
                                 f"{store.uri_of(f'datamodels/{run}/metagrad')} - rerun to do only the missing ones")
    out = []
    for job, state in zip(jobs, states):
        scores, _ = state.committed()
        c = job.data.n_clusters
        if job.run_cfg.recipe == "distcur":
            out.append((*combine_distcur(scores, state.candidate_sets, c), None))
        else:
            out.append((*combine_reference(scores, c), round_pools(scores, c, job.run_cfg, job.round_size)[1]))
    return out
