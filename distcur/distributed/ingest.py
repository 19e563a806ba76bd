"""Ray Data executors for ingest: one Ray Data task per shard (an RLDS shard file, an HDF5 file or
group of demos, a Parquet file, a LeRobot data file), and ``ray.data.read_lerobot``'s frames.

The ingest stage (:mod:`distcur.stages.ingest`) hands :class:`RayDataShards` the task (read,
parse, convert, validate, write parts) and the user-error types of the source; this module only
maps the task over the shards. Data never flows through the driver: each task writes its own
immutable parts to the store and returns their paths and statistics, which the stage commits.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Iterator

from distcur.distributed.session import ensure_ray

# Forwarded to the read tasks (when set in the driver) so workers reach the same S3 endpoint as the
# driver. Never credentials: a runtime env is written in plain text to Ray's logs and shown by its
# dashboard. Workers get credentials the way AWS intends: a local Ray's workers inherit the driver's
# process environment; on a cluster, the instance profile / IRSA role of the nodes.
S3_ENV_VARS = (
    "DISTCUR_S3_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def map_ray_data(task: Callable, shards: list, errors: Iterable[type] = (), progress: bool = True,
                 num_cpus: float = 1.0) -> Iterator:
    """Run ``task`` once per shard (any picklable object) as Ray Data tasks, one block (hence one
    task) per shard, and yield its results (picklable) as they come (not in shard order: a result
    names its shard, and the caller sorts). An error of one of the
    ``errors`` types raised in a task (a user's bad input, naming file/episode/column) is raised
    here with its own type and message, as without Ray; anything else propagates as Ray's error."""
    import ray

    by_name = {e.__name__: e for e in errors}
    caught = tuple(by_name.values())
    ray.data.DataContext.get_current().enable_progress_bars = progress
    # the S3 endpoint settings, never credentials, as the tasks' environment
    env = {k: os.environ[k] for k in S3_ENV_VARS if os.environ.get(k)}
    remote_args: dict = {"num_cpus": num_cpus}
    if env:
        remote_args["runtime_env"] = {"env_vars": env}

    def run_shard(row: dict) -> dict:
        try:
            return {"result": pickle.dumps(task(pickle.loads(row["shard"]))), "error": "", "message": ""}
        except caught as e:
            return {"result": b"", "error": type(e).__name__, "message": str(e)}

    items = [{"shard": pickle.dumps(s)} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(shards)).map(run_shard, **remote_args)
    for row in ds.iter_rows():
        if row["error"]:
            raise by_name[row["error"]](row["message"])
        yield pickle.loads(row["result"])


class RayDataShards:
    """The Ray Data executor of the ingest stage: ``executor(task, shards, errors=...)`` maps
    ``task`` over ``shards`` with :func:`map_ray_data`, joining ``address`` (or ``RAY_ADDRESS``) or
    starting a local Ray on first use. It can also stream a LeRobot dataset's frames through
    ``ray.data.read_lerobot`` (:meth:`read_lerobot`)."""

    def __init__(self, address: str | None = None, progress: bool = True, num_cpus: float = 1.0):
        self.address, self.progress, self.num_cpus = address, progress, num_cpus

    def __call__(self, task: Callable, shards: list, errors: Iterable[type] = ()) -> Iterator:
        ensure_ray(self.address)
        return map_ray_data(task, shards, errors, progress=self.progress, num_cpus=self.num_cpus)

    def read_lerobot(self, uri: str) -> Iterator:
        ensure_ray(self.address)
        return read_lerobot_batches(uri)


def ray_mapper(address: str | None = None, progress: bool = True) -> RayDataShards:
    """The Ray Data executor for the ingest stage (joins or starts Ray)."""
    ensure_ray(address)
    return RayDataShards(address, progress)


def read_lerobot_batches(uri: str) -> Iterator:
    """A LeRobot dataset's frames as pyarrow tables, streamed by ``ray.data.read_lerobot`` (Ray >=
    2.60, the ``lerobot`` package >= 0.5), one episode's frames per read; Ray's own columns
    ``stats`` and ``dataset_index`` dropped."""
    import ray

    frames = ray.data.read_lerobot(uri, read_granularity="episode")
    drop = [c for c in ("stats", "dataset_index") if c in frames.schema().names]
    for batch in frames.iter_batches(batch_format="pyarrow", batch_size=None):
        yield batch.drop_columns([c for c in drop if c in batch.column_names])
