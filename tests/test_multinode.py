"""Stages on a multi-node Ray cluster (``ray.cluster_utils.Cluster``) survive losing a node.

A head node (which runs the driver) and a worker node share the work; the worker is removed
while the stage is running: as soon as its first output part is committed, so the rest is
still in flight on both nodes. Ray retries the lost tasks and rebuilds lost objects from
lineage on the head, and the stage's output must equal an undisturbed run's exactly:

- IWR (distributed KDE partial sums, :func:`distcur.stages.score.run_iwr`, as a Ray task grid and on
  Ray Data): scores table;
- a DataMIL regression batch run (:func:`distcur.stages.datamodel.run_subset_batches`):
  the merged (model, proxy loss) table.
"""

from __future__ import annotations

import glob
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("distcur.distributed.kde", reason="distributed KDE (distcur/distributed/kde.py) not built yet")
pytest.importorskip("distcur.stages.datamodel", reason="the datamodel stage not built yet")

from distcur.data import embeddings_key  # noqa: E402
from distcur.schema import EMBEDDING_SCHEMA  # noqa: E402
from distcur.store import Store  # noqa: E402

WORKER_CPUS = 2


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, runs this driver) + one worker node; each test adds the worker it removes."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
    yield c
    ray.shutdown()
    c.shutdown()


def _add_worker(cluster):
    node = cluster.add_node(num_cpus=WORKER_CPUS)
    cluster.wait_for_nodes()
    return node


class NodeKiller:
    """Removes ``node`` from ``cluster`` once ``progress()`` (outputs committed so far) is >= 1."""

    def __init__(self, cluster, node, progress, timeout_s: float = 300.0):
        self.cluster, self.node, self.progress = cluster, node, progress
        self.progress_at_removal: int | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(timeout_s,), daemon=True)

    def _run(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        try:
            while not self._stop.is_set() and time.time() < deadline:
                done = self.progress()
                if done >= 1:
                    self.progress_at_removal = done
                    self.cluster.remove_node(self.node, allow_graceful=False)
                    return
                time.sleep(0.02)
        except BaseException as e:  # reported by the test, not lost in the thread
            self.error = e

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=120)


def _embedding_table(z: np.ndarray, source: str, episode_len: int = 50) -> pa.Table:
    n, d = z.shape
    idx = np.arange(n)
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    return pa.Table.from_arrays(
        [pa.array([source] * n), pa.array(idx // episode_len, pa.int64()), pa.array(idx % episode_len, pa.int32()),
         pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(z, np.float32).ravel()))],
        schema=EMBEDDING_SCHEMA,
    )


def _parts_committed(store: Store, key: str) -> int:
    return len(glob.glob(os.path.join(store.path(key), "_data-*", "part-*.parquet")))


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["tasks", "ray-data"])
def test_iwr_scores_survive_losing_a_node(cluster, tmp_path, executor):
    from distcur.methods import IwrConfig
    from distcur.stages.score import run_iwr

    store = Store(str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    prior_keys = []
    for i, (n, shift) in enumerate([(3000, 0.0), (3000, 1.0)]):
        key = embeddings_key("test", f"prior{i}")
        z = rng.normal(size=(n, 6)) + shift
        store.write_table(key, _embedding_table(z, f"prior{i}"), stage="embed", rows_per_part=500)
        prior_keys.append(key)
    target_key = embeddings_key("test", "target")
    store.write_table(target_key, _embedding_table(rng.normal(size=(200, 6)) + 0.8, "target"), stage="embed")
    num_shards = 12

    _add_worker(cluster)
    reference = run_iwr(store, prior_keys, target_key, "scores/iwr-undisturbed",
                        IwrConfig(num_shards=num_shards, executor=executor))

    worker = _add_worker(cluster)
    with NodeKiller(cluster, worker, lambda: _parts_committed(store, "scores/iwr-disturbed")) as killer:
        disturbed = run_iwr(store, prior_keys, target_key, "scores/iwr-disturbed",
                            IwrConfig(num_shards=num_shards, executor=executor))
    assert disturbed.metadata["executor"] == executor
    assert killer.error is None, killer.error
    assert killer.progress_at_removal is not None, "the worker node was never removed"
    assert killer.progress_at_removal < num_shards, "the stage finished before the node was removed"

    assert disturbed.rows == reference.rows == 6000
    order = ["source", "episode", "step"]
    a = store.read_table("scores/iwr-undisturbed").sort_by([(c, "ascending") for c in order])
    b = store.read_table("scores/iwr-disturbed").sort_by([(c, "ascending") for c in order])
    assert a.equals(b)


# In `make test` (the node-loss check every change gets); the IWR one above is in the slow set.
def test_datamodel_batches_survive_losing_a_node(cluster, tmp_path):
    from distcur.datamodels.subsets import SubsetTrainingData, SubsetTrainSettings, plan_batches, subset_masks
    from distcur.distributed.tasks import RayTasks
    from distcur.policy.functional import AdamConfig, PolicySpec
    from distcur.stages.datamodel import batch_key, run_subset_batches

    store = Store(str(tmp_path / "store"))
    rng = np.random.default_rng(1)
    n_clusters, ds, da = 12, 6, 2
    n_prior, n_target = 480, 60
    group = np.concatenate([rng.integers(0, n_clusters, n_prior), np.full(n_target, -1)]).astype(np.int64)
    data = SubsetTrainingData(
        obs=rng.normal(size=(n_prior + n_target, ds)).astype(np.float32),
        act=np.tanh(rng.normal(size=(n_prior + n_target, da))).astype(np.float32),
        group=group,
        n_clusters=n_clusters,
        proxy_obs=rng.normal(size=(60, ds)).astype(np.float32),
        proxy_act=np.tanh(rng.normal(size=(60, da))).astype(np.float32),
    )
    models = np.arange(16)
    masks = subset_masks(models, n_clusters, keep_prob=0.5, seed=0)
    settings = SubsetTrainSettings(spec=PolicySpec(ds, da, hidden=(32, 32)), adam=AdamConfig(lr=1e-3), steps=150,
                                   batch_size=64, target_fraction=0.25, seed=0)
    per_batch = 2
    n_batches = len(plan_batches(models, per_batch))

    _add_worker(cluster)
    reference, stats = run_subset_batches(store, "undisturbed", models, masks, data, settings, per_batch, {},
                                          RayTasks(max_retries=3))
    assert stats == {"batches": n_batches, "trained": n_batches, "skipped": 0}

    def committed() -> int:
        return sum(store.manifest(batch_key("disturbed", i)) is not None for i in range(n_batches))

    worker = _add_worker(cluster)
    with NodeKiller(cluster, worker, committed) as killer:
        disturbed, stats = run_subset_batches(store, "disturbed", models, masks, data, settings, per_batch, {},
                                              RayTasks(max_retries=3))
    assert killer.error is None, killer.error
    assert killer.progress_at_removal is not None, "the worker node was never removed"
    assert killer.progress_at_removal < n_batches, "the stage finished before the node was removed"
    assert stats["trained"] == n_batches
    assert disturbed.num_rows == len(models)
    assert disturbed.equals(reference)
    assert np.isfinite(disturbed.column("proxy").to_numpy()).all()
