"""Subset models over Ray tasks, with a completed-bitmap in the store.

The m subset models of a regression datamodel are cut into batches of ``models_per_batch``;
one Ray task trains one batch (stacked, in one process, see
:func:`distcur.datamodels.subsets.train_subset_models`) and commits its proxy losses as its own
immutable table ``datamodels/<run>/results/batch=<i>``. Batch i is complete when that table is
committed with the batch's config (model ids, mask fingerprint, training settings): the
completed-bitmap is read from those manifests, never from a shared mutable file, so parallel
workers cannot race on it. A rerun trains only the batches whose bit is 0; a killed worker
loses only its unfinished batch. The driver merges the parts into one table at the end.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distcur.datamodels.subsets import SubsetTrainingData, train_subset_models
from distcur.policy.functional import AdamConfig, PolicySpec
from distcur.progress import bar
from distcur.store import Store

log = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([pa.field("model", pa.int64(), nullable=False), pa.field("proxy", pa.float64(), nullable=False)])
BATCH_STAGE = "datamodel-batch"


def results_prefix(run: str) -> str:
    return f"datamodels/{run}/results"


def batch_key(run: str, batch: int) -> str:
    return f"{results_prefix(run)}/batch={batch:05d}"


@dataclass(frozen=True)
class SubsetTrainSettings:
    """How each subset model is trained (identical for every batch of a run)."""

    spec: PolicySpec
    adam: AdamConfig
    steps: int
    batch_size: int
    target_fraction: float
    seed: int
    shared_init: bool = True  # every model starts from the same init and sees the same minibatch rows
    proxy: str = "nll"  # distcur.policy.proxy.PROXIES

    def as_dict(self) -> dict:
        return {
            "hidden": list(self.spec.hidden),
            "state_dim": self.spec.state_dim,
            "action_dim": self.spec.action_dim,
            "adam": self.adam.__dict__,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "target_fraction": self.target_fraction,
            "seed": self.seed,
            "shared_init": self.shared_init,
            "proxy": self.proxy,
        }


def plan_batches(models: np.ndarray, models_per_batch: int) -> list[np.ndarray]:
    """Model ids cut into consecutive batches."""
    if models_per_batch <= 0:
        raise ValueError(f"models_per_batch must be positive, got {models_per_batch}")
    return [models[i : i + models_per_batch] for i in range(0, len(models), models_per_batch)]


def _masks_fingerprint(masks: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.asarray(masks, bool), axis=1).tobytes()).hexdigest()[:16]


def _batch_config(batch: int, models: np.ndarray, masks: np.ndarray, settings: SubsetTrainSettings) -> dict:
    return {"batch": batch, "models": [int(m) for m in models], "masks": _masks_fingerprint(masks),
            "train": settings.as_dict()}


def completed_bitmap(store: Store, run: str, models: np.ndarray, masks: np.ndarray, settings: SubsetTrainSettings,
                     models_per_batch: int, inputs: dict[str, str]) -> np.ndarray:
    """(n_batches,) bool: batch i's results are committed for exactly this batch config and inputs."""
    batches = plan_batches(np.asarray(models), models_per_batch)
    return np.array([
        store.is_done(batch_key(run, i), BATCH_STAGE,
                      _batch_config(i, b, masks[i * models_per_batch : i * models_per_batch + len(b)], settings), inputs)
        for i, b in enumerate(batches)
    ], bool)


def train_and_store_batch(store: Store, run: str, batch: int, models: np.ndarray, masks: np.ndarray,
                          data: SubsetTrainingData, settings: SubsetTrainSettings, inputs: dict[str, str],
                          fault_marker: str | None = None) -> int:
    """Train one batch of subset models and commit its results table; returns the rows written.

    ``fault_marker``: for fault-injection tests, a file listing batch indices; a task whose
    batch is listed exits its worker process abruptly (``os._exit``) before committing."""
    import torch

    torch.set_num_threads(1)
    if fault_marker and os.path.exists(fault_marker):
        with open(fault_marker) as f:
            if str(batch) in f.read().split():
                os._exit(1)
    batch_seed = settings.seed if settings.shared_init else settings.seed * 1_000_003 + batch
    init_seeds = np.full(len(models), settings.seed) if settings.shared_init else np.asarray(models) + settings.seed
    proxy = train_subset_models(data, masks, init_seeds, settings.spec, settings.adam, settings.steps,
                                settings.batch_size, settings.target_fraction, batch_seed, settings.proxy)
    table = pa.Table.from_pydict({"model": np.asarray(models, np.int64), "proxy": proxy}, schema=RESULT_SCHEMA)
    store.write_table(batch_key(run, batch), table, stage=BATCH_STAGE,
                      config=_batch_config(batch, models, masks, settings), inputs=inputs)
    return table.num_rows


class BatchesFailed(RuntimeError):
    """Some batches did not complete; the completed ones are committed, a rerun fills the rest."""


def run_subset_batches(store: Store, run: str, models: np.ndarray, masks: np.ndarray, data: SubsetTrainingData,
                       settings: SubsetTrainSettings, models_per_batch: int, inputs: dict[str, str],
                       address: str | None = None, max_retries: int = 1,
                       fault_marker: str | None = None) -> tuple[pa.Table, dict]:
    """Train every model (one Ray task per missing batch) and merge the results.

    ``models`` (m,) ids and ``masks`` (m, C) bool. Returns the merged (model, proxy) table sorted
    by model and stats {"batches", "trained", "skipped"}. Raises :class:`BatchesFailed` naming the
    failed batches after every other batch has finished and committed.
    """
    import ray

    from distcur.distributed.session import ensure_ray

    batches = plan_batches(np.asarray(models), models_per_batch)
    batch_masks = [masks[i : i + models_per_batch] for i in range(0, len(models), models_per_batch)]
    done = completed_bitmap(store, run, models, masks, settings, models_per_batch, inputs)
    todo = np.flatnonzero(~done)
    log.info("datamodel %s: %d of %d batches complete, training %d", run, int(done.sum()), len(batches), len(todo))
    if len(todo):
        # the bar opens before Ray starts and the training data goes to the object store (seconds
        # on a loaded machine), so a terminal never waits without output
        with bar(total=len(todo), desc=f"datamodel {run} batches", unit="batch") as progress:
            ensure_ray(address)
            remote = ray.remote(num_cpus=1, max_retries=max_retries)(train_and_store_batch)
            data_ref = ray.put(data)
            futures = {
                remote.remote(store, run, int(i), batches[i], batch_masks[i], data_ref, settings, inputs,
                              fault_marker): int(i)
                for i in todo
            }
            failed: dict[int, str] = {}
            pending = list(futures)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    ray.get(ready[0])
                except (ray.exceptions.RayError, OSError) as e:
                    failed[futures[ready[0]]] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                progress.update()
        if failed:
            raise BatchesFailed(
                f"datamodel {run}: {len(failed)} of {len(batches)} batches failed {sorted(failed)} "
                f"(first: {next(iter(failed.values()))}); the others are committed under "
                f"{store.uri_of(results_prefix(run))} - rerun to train only the missing ones"
            )
    parts = [store.read_table(batch_key(run, i)) for i in range(len(batches))]
    merged = pa.concat_tables(parts).sort_by("model")
    return merged, {"batches": len(batches), "trained": int(len(todo)), "skipped": int(done.sum())}
