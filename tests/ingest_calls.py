"""The ingest stage (:mod:`distcur.stages.ingest`) called the way the source tests read: a source's
files, the store, the source name, the reader's options. Each builds the stage config and runs it
(in this process unless an ``executor`` is given, e.g. ``ray_mapper(progress=False)``)."""

from __future__ import annotations

from distcur.sources.hdf5 import HDF5Config
from distcur.sources.lerobot import LeRobotConfig
from distcur.stages.ingest import (
    HDF5IngestConfig,
    LeRobotIngestConfig,
    ParquetIngestConfig,
    RLDSIngestConfig,
    run_hdf5,
    run_lerobot,
    run_parquet,
    run_rlds,
)


def ingest_hdf5(paths, store, source, config: HDF5Config | None = None, executor=None, demos_per_shard=None, **kw):
    cfg = HDF5IngestConfig(paths=tuple(map(str, paths)), source=source, hdf5=config or HDF5Config(),
                           demos_per_shard=demos_per_shard)
    return run_hdf5(store, cfg, executor, **kw)


def ingest_parquet(path, store, source, mapping, executor=None, rows_per_part: int = 100_000, **kw):
    cfg = ParquetIngestConfig(path=str(path), source=source, map=tuple(mapping), rows_per_part=rows_per_part)
    return run_parquet(store, cfg, executor, **kw)


def ingest_lerobot(root, store, source, config: LeRobotConfig | None = None, executor=None, reader: str = "auto",
                   **kw):
    cfg = LeRobotIngestConfig(root=str(root), source=source, lerobot=config or LeRobotConfig(), reader=reader)
    return run_lerobot(store, cfg, executor, **kw)


def ingest_rlds(path, config, store, source=None, splits=("train",), executor=None, rows_per_part: int = 100_000,
                **kw):
    """``config`` is an :class:`~distcur.sources.rlds_configs.RLDSConfig` described in code."""
    cfg = RLDSIngestConfig(path=str(path), dataset=config.name, source=source, splits=tuple(splits),
                           rows_per_part=rows_per_part)
    return run_rlds(store, cfg, executor, rlds_config=config, **kw)


def ingest_rlds_ray(path, config, store, **kw):
    """:func:`ingest_rlds` with one Ray Data read task per shard file."""
    from distcur.distributed.ingest import ray_mapper

    return ingest_rlds(path, config, store, executor=ray_mapper(progress=kw.get("progress", True)), **kw)
