"""What the file-based sources (HDF5, Parquet, LeRobot) share: a shard of work, a writer of
validated parts, and the commit of all shards' parts as one table.

The pattern is that of :mod:`distcur.sources.rlds`: the driver plans shards (a file, or a group of
its episodes) with their episode ids fixed up front; a task converts one shard into step-table
columns episode by episode (:class:`PartWriter` validates and writes whole parts under the
writer's data dir); :func:`commit_shards` maps the task over the shards with a pluggable mapper
(sequential here; Ray Data in :mod:`distcur.distributed.ingest`) and commits one manifest. Any
error deletes the partial parts; the previously committed table stays as it was.
"""

from __future__ import annotations

import functools
import io
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distcur.data import steps_key
from distcur.schema import STEP_SCHEMA, StepValidationError, steps_table, validate_steps
from distcur.sources.rlds import IngestResult, merge_stats, part_stats
from distcur.store import Store

PART_NAME = "part-{shard:05d}-{chunk:04d}.parquet"


class SourceFormatError(ValueError):
    """Input a source cannot read; the message names the file, episode (demo) and key/column."""


@dataclass
class ShardResult:
    """What one task wrote: its parts (relative to the store root), their statistics, and the
    per-episode facts the manifest records (keyed by episode id, JSON-able)."""

    shard: int
    uri: str
    files: list[str]
    rows: int
    episodes: int
    stats: list[dict[str, Any]]
    episode_info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_bytes(self) -> bytes:
        return pickle.dumps(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardResult:
        return pickle.loads(data)


class PartWriter:
    """Collects the step columns of whole episodes and writes validated parts of about
    ``rows_per_part`` steps (or ``bytes_per_part`` of images) under ``data_dir``."""

    def __init__(self, store: Store, data_dir: str, shard: int, uri: str, rows_per_part: int = 100_000,
                 bytes_per_part: int = 64 << 20):
        self.store, self.data_dir, self.shard, self.uri = store, data_dir, shard, uri
        self.rows_per_part, self.bytes_per_part = rows_per_part, bytes_per_part
        self.files: list[str] = []
        self.stats: list[dict[str, Any]] = []
        self.rows = self.episodes = 0
        self._pending: list[tuple[dict[str, Any], str]] = []
        self._rows = self._bytes = 0
        self._dims: tuple[int, int, str] | None = None  # state and action dims of the first episode
        self._t0 = time.time()

    def add(self, cols: dict[str, Any], where: str) -> None:
        """One episode's columns (see :func:`distcur.schema.steps_table`); ``where`` names it for errors."""
        dims = tuple(np.shape(cols[c])[1] if np.ndim(cols[c]) == 2 else -1 for c in ("state", "action"))
        if self._dims is None:
            self._dims = (*dims, where)
        for column, got, want in zip(("state", "action"), dims, self._dims[:2]):
            if got != want and -1 not in (got, want):
                raise StepValidationError(f"{where}: inconsistent {column} dim: got {got}, expected {want} like "
                                          f"{self._dims[2]} (column {column!r})")
        self._pending.append((cols, where))
        self._rows += len(cols["episode"])
        if cols.get("image") is not None:
            self._bytes += sum(len(b) for b in cols["image"] if b is not None)
        self.episodes += 1
        if self._rows >= self.rows_per_part or self._bytes >= self.bytes_per_part:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        chunks = [c for c, _ in self._pending]
        where = [w for _, w in self._pending]
        origin = where[0] if len(where) == 1 else f"{where[0]} .. {where[-1]}"
        for cols, w in self._pending:  # a bad episode is named by its own file and demo
            try:
                validate_steps(steps_table(cols), origin=w)
            except StepValidationError:
                raise
            except (ValueError, TypeError) as e:  # pyarrow conversion of a malformed column
                raise SourceFormatError(f"{w}: cannot build its step table ({type(e).__name__}: {e})") from e
        cols = concat_columns(chunks)
        table = validate_steps(steps_table(cols), origin=origin)
        rel = f"{self.data_dir}/{PART_NAME.format(shard=self.shard, chunk=len(self.files))}"
        self.store.write_parquet(rel, table)
        self.files.append(rel)
        self.stats.append(part_stats(cols["state"], cols["action"], len(chunks)))
        self.rows += table.num_rows
        self._pending, self._rows, self._bytes = [], 0, 0

    def result(self, episode_info: dict | None = None, extra: dict | None = None) -> ShardResult:
        self.flush()
        return ShardResult(shard=self.shard, uri=self.uri, files=self.files, rows=self.rows, episodes=self.episodes,
                           stats=self.stats, episode_info=episode_info or {}, extra=extra or {},
                           wall_s=round(time.time() - self._t0, 3))


def concat_columns(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in chunks[0]:
        values = [c[name] for c in chunks]
        if all(v is None for v in values):
            out[name] = None
        elif all(isinstance(v, str) for v in values) and len(set(values)) == 1:
            out[name] = values[0]  # one value for every row (the source name)
        elif any(v is None for v in values):
            out[name] = [x for c, v in zip(chunks, values)
                         for x in (v if v is not None else [None] * len(c["episode"]))]
        elif all(isinstance(v, np.ndarray) for v in values):
            out[name] = np.concatenate(values)
        else:
            out[name] = [x for v in values for x in v]
    return out


def episode_flags(t: int) -> tuple[np.ndarray, np.ndarray]:
    """is_first, is_last of an episode of ``t`` steps."""
    first, last = np.zeros(t, bool), np.zeros(t, bool)
    if t:
        first[0], last[-1] = True, True
    return first, last


def encode_image(frame: np.ndarray, fmt: str = "png") -> bytes:
    """One HxWx3 uint8 frame as PNG or JPEG bytes (what the step table keeps in ``image``)."""
    from distcur.deps import require

    Image = require("PIL.Image", "encoding camera frames")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="JPEG" if fmt in ("jpeg", "jpg") else "PNG")
    return buf.getvalue()


# -- mapping tasks over shards -------------------------------------------------------------------

Task = Callable[[Any], ShardResult]
Mapper = Callable[[Task, list], Iterable[ShardResult]]


def map_sequential(task: Task, shards: list, progress: bool = True, desc: str = "ingest shards") -> Iterator[ShardResult]:
    """Run ``task`` on each shard in this process (the ``--no-ray`` path)."""
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc=desc, unit="shard")
    for shard in shards:
        yield task(shard)


def commit_shards(
    store: Store,
    source: str,
    stage: str,
    stage_config: dict,
    inputs: dict[str, str],
    shards: list,
    make_task: Callable[[str], Task],
    metadata: Callable[[list[ShardResult]], dict],
    mapper: Mapper | None = None,
    force: bool = False,
    progress: bool = True,
    empty_message: str = "no steps",
) -> IngestResult:
    """Skip when done; else run ``make_task(data_dir)`` on every shard and commit ``steps/source=<source>``.

    ``metadata(results)`` returns the source's manifest fields besides the merged dims and action
    statistics (file/demo per episode, keys, control frequency, ...).
    """
    key = steps_key(source)
    if not force and store.is_done(key, stage, stage_config, inputs):
        return IngestResult(key=key, manifest=store.manifest(key), skipped=True)
    writer = store.writer(key, stage, stage_config, inputs)
    mapper = mapper or functools.partial(map_sequential, progress=progress)
    try:
        results = sorted(mapper(make_task(writer.data_dir), shards), key=lambda r: r.shard)
        if len(results) != len(shards):
            raise RuntimeError(f"ingest of {source}: {len(results)} shard results for {len(shards)} shards")
        parts = [(s, f"{r.uri} part {i}") for r in results for i, s in enumerate(r.stats)]
        if not parts:
            raise SourceFormatError(f"source {source!r}: {empty_message}")
        meta = merge_stats([p[0] for p in parts], [p[1] for p in parts])
        meta.update(metadata(results))
        writer.add_files([f for r in results for f in r.files], rows=sum(r.rows for r in results),
                         schema=STEP_SCHEMA)
        manifest = writer.commit({source: meta})
    except BaseException:
        writer.abort()
        raise
    return IngestResult(key=key, manifest=manifest, skipped=False, shard_results=results)
