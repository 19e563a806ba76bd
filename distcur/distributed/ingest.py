"""Ray Data glue for ingest: one read task per RLDS shard file (or HDF5 / Parquet / LeRobot shard).

The work of a task (read, parse, convert, validate, write parts) is
:func:`distcur.sources.rlds.ingest_shard`; this module only maps it over shards with Ray
Data and hands the small per-shard results back to :func:`distcur.sources.rlds.ingest_rlds`,
which commits the table. Data never flows through the driver: each task writes its own
immutable parts to the store and returns their paths and statistics.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator

from distcur.distributed.session import ensure_ray
from distcur.schema import StepValidationError
from distcur.sources.rlds import (
    IngestResult,
    RLDSConfig,
    RLDSFormatError,
    Shard,
    ShardResult,
    ShardTask,
    ingest_rlds,
)
from distcur.store import Store

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
# Errors a read task reports back as data (type and message) so the caller gets the same
# exception, naming file/episode/column, as without Ray; anything else propagates as Ray's error.
_USER_ERRORS = {e.__name__: e for e in (RLDSFormatError, StepValidationError)}


def _map_ray_data(task, shards: list, errors: dict[str, type], progress: bool, num_cpus: float) -> Iterator:
    """Run ``task`` once per shard (any picklable object) as Ray Data tasks, one block (hence one
    task) per shard, and yield its results (picklable) in shard order. An input error of a type in
    ``errors`` raised in a task is raised here with its own type and message, as without Ray."""
    import pickle

    import ray

    ray.data.DataContext.get_current().enable_progress_bars = progress
    # the S3 endpoint settings, never credentials, as the tasks' environment
    env = {k: os.environ[k] for k in S3_ENV_VARS if os.environ.get(k)}
    remote_args: dict = {"num_cpus": num_cpus}
    if env:
        remote_args["runtime_env"] = {"env_vars": env}

    def run_shard(row: dict) -> dict:
        try:
            return {"result": pickle.dumps(task(pickle.loads(row["shard"]))), "error": "", "message": ""}
        except tuple(errors.values()) as e:
            return {"result": b"", "error": type(e).__name__, "message": str(e)}

    items = [{"shard": pickle.dumps(s)} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(shards)).map(run_shard, **remote_args)
    for row in ds.iter_rows():
        if row["error"]:
            raise errors[row["error"]](row["message"])
        yield pickle.loads(row["result"])


def map_shards_ray_data(
    task: ShardTask, shards: list[Shard], progress: bool = True, num_cpus: float = 1.0
) -> Iterator[ShardResult]:
    """Run an RLDS shard ``task`` once per shard as Ray Data tasks (one per shard)."""
    return _map_ray_data(task, shards, _USER_ERRORS, progress, num_cpus)


# the file-based sources' own input errors, reported back the same way
def _source_errors() -> dict[str, type]:
    from distcur.deps import MissingDependencyError
    from distcur.sources.common import SourceFormatError

    return {e.__name__: e for e in (SourceFormatError, StepValidationError, MissingDependencyError)}


def map_tasks_ray_data(task, shards: list, progress: bool = True, num_cpus: float = 1.0):
    """Run a file source's ``task`` (returning a :class:`distcur.sources.common.ShardResult`) once
    per shard as Ray Data tasks; its input errors (:class:`~distcur.sources.common.SourceFormatError`,
    a step validation error, a missing optional package) are raised here as on the ``--no-ray`` path."""
    return _map_ray_data(task, shards, _source_errors(), progress, num_cpus)


def ray_mapper(address: str | None = None, progress: bool = True):
    """The Ray Data mapper for :func:`distcur.sources.common.commit_shards` (joins or starts Ray)."""
    ensure_ray(address)
    return functools.partial(map_tasks_ray_data, progress=progress)


def ingest_rlds_ray(
    dataset_uri: str,
    config: RLDSConfig,
    store: Store,
    source: str | None = None,
    splits: Iterable[str] = ("train",),
    address: str | None = None,
    force: bool = False,
    rows_per_part: int = 100_000,
    progress: bool = True,
) -> IngestResult:
    """:func:`distcur.sources.rlds.ingest_rlds` with one Ray Data read task per shard file.

    Joins ``address`` (or ``RAY_ADDRESS``) or starts a local Ray.
    """
    ensure_ray(address)
    return ingest_rlds(
        dataset_uri, config, store, source=source, splits=splits,
        mapper=functools.partial(map_shards_ray_data, progress=progress),
        force=force, rows_per_part=rows_per_part, progress=progress,
    )
