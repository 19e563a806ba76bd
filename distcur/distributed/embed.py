"""Ray Data map executor: a pool of actors mapping a callable class over Parquet files, and one-off
Ray tasks on the resources they need.

What the actors compute is handed in (the embed stage, :mod:`distcur.stages.embed`, gives its
embedding actor: decode, encode); this module only runs it. :meth:`RayDataMap.map_parquet` reads
the files with ``ray.data.read_parquet``, maps ``fn_class`` over batches in an
``ActorPoolStrategy`` pool (each actor built once with ``fn_kwargs``, batches as Arrow tables) and
writes the actors' output tables as Parquet under ``out_dir``: no process ever holds a whole
input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from distcur.distributed.session import ensure_ray

log = logging.getLogger(__name__)


class RayDataMap:
    """Ray Data (and Ray task) runs on the Ray at ``address`` (default: RAY_ADDRESS or a local Ray)."""

    def __init__(self, address: str | None = None):
        self.address = address

    def start(self) -> None:
        ensure_ray(self.address)

    def call(self, fn: Callable, *args: Any, num_gpus: float = 0.0, num_cpus: float = 1.0, max_retries: int = 1) -> Any:
        """``fn(*args)`` in one Ray task holding ``num_gpus`` GPUs (e.g. a fit on a GPU node); its result."""
        import ray

        self.start()
        task = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_retries=max_retries)(fn)
        return ray.get(task.remote(*args))

    def actors(self, concurrency: int, num_cpus: float) -> int:
        """The pool size: ``concurrency`` actors at most, leaving a CPU for Ray Data's read and write
        tasks (or the pipeline stalls), at least one."""
        import ray

        spare = max(0.0, ray.cluster_resources().get("CPU", 1.0) - 1.0)
        return max(1, min(concurrency, int(spare // max(num_cpus, 1e-3))))

    def map_parquet(self, paths: Sequence[str], filesystem: Any, columns: Sequence[str], fn_class: type,
                    fn_kwargs: dict, out_dir: str, *, batch_size: int, concurrency: int, num_cpus: float = 1.0,
                    num_gpus: float = 0.0) -> None:
        """Map ``fn_class(**fn_kwargs)(table) -> table`` over the ``columns`` of the Parquet ``paths``
        by a pool of actors; the output tables are written as Parquet files under ``out_dir``."""
        import ray

        ds = ray.data.read_parquet(list(paths), filesystem=filesystem, partitioning=None).select_columns(
            list(columns))
        ds = ds.map_batches(
            fn_class,
            fn_constructor_kwargs=fn_kwargs,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.actors(concurrency, num_cpus)),
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
        )
        ds.write_parquet(out_dir, filesystem=filesystem)
