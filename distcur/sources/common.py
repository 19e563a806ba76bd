"""What the file-based sources (HDF5, Parquet, LeRobot) share: a shard's result, a writer of
validated parts, and the sequential map over shards.

The pattern is that of :mod:`distcur.sources.rlds`: the driver plans shards (a file, or a group of
its episodes) with their episode ids fixed up front; a task converts one shard into step-table
columns episode by episode, and :class:`PartWriter` validates whole parts and hands each to a
``sink(name, table) -> path`` it is given (the ingest stage's sink writes it under the store
writer's data dir; no reader sees the store). The stage
(:func:`distcur.stages.ingest.commit_shards`) maps the task over the shards with an executor
(:func:`map_sequential` here; Ray Data in :mod:`distcur.distributed.ingest`) and commits one
manifest.
"""

from __future__ import annotations

import io
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from distcur.schema import StepValidationError, steps_table, validate_steps
from distcur.sources.rlds import part_stats

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


# sink(part file name, table) -> the path it was written to (what the manifest lists)
Sink = Callable[[str, pa.Table], str]


class PartWriter:
    """Collects the step columns of whole episodes and hands validated parts of about
    ``rows_per_part`` steps (or ``bytes_per_part`` of images) to ``sink``."""

    def __init__(self, sink: Sink, shard: int, uri: str, rows_per_part: int = 100_000,
                 bytes_per_part: int = 64 << 20):
        self.sink, self.shard, self.uri = sink, shard, uri
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
        self.files.append(self.sink(PART_NAME.format(shard=self.shard, chunk=len(self.files)), table))
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
Mapper = Callable[..., Iterable[ShardResult]]


def map_sequential(task: Callable, shards: list, progress: bool = True, desc: str = "ingest shards",
                   errors: dict[str, type] | None = None) -> Iterator:
    """Run ``task`` on each shard in this process, in order (the ``--no-ray`` path). ``errors``
    (the user-error types an executor re-raises) is accepted for the executors' signature: here
    every exception propagates as it is."""
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc=desc, unit="shard")
    for shard in shards:
        yield task(shard)
