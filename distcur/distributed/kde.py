"""Executors of a blockwise all-pairs reduction: query blocks x reference shards, on Ray.

What runs is handed in; this module knows no KDE, no store and no table layout. A caller gives

- ``loads``: one argument tuple per shard, and ``load(*args) -> (queries, carry, refs, probe)``:
  the shard's query points [rows, d], a ``carry`` table of per-row columns handed back to
  ``write`` (one row per query), the shard's rows of the reference subsample (``refs="own"``:
  ignored) and of a probe set (both [r, d]);
- ``block_fn(queries, refs, h) -> [rows]``: one block's partial reduction against one shard;
- ``combine(partials) -> [rows]``: the reduction of a block's K partials (in shard order);
- ``write(i, carry, *reduced) -> result``: block ``i``'s output (one reduced array per bandwidth),
  returning something small and picklable;
- ``bandwidths``: the ``h`` of each reduction.

Each block is reduced against every shard's queries (``refs="own"``) or every shard's reference
rows (``refs="subsample"``). No task ever holds more than two shards; the driver holds only object
references. Two executors give the same bits:

- :class:`TaskGrid` (``"tasks"``): plain Ray tasks, one per (block, shard, bandwidth) pair, a
  combine task per (block, bandwidth) and a write task per block;
- :class:`RayDataGrid` (``"ray-data"``): each load task returns its shard as one Arrow table (the
  carry columns, ``block`` and the points ``y`` as a fixed-size list), the tables are a Ray Data
  dataset of query blocks (``ray.data.from_arrow_refs``), and one ``map_batches`` task per block
  (``batch_size=None``: the whole block; :func:`_score_block` refuses a batch spanning two)
  fetches the reference shards one at a time with ``ray.get``, reduces and writes: Ray Data's
  retries on a lost node.

``probe_bandwidth``: the probe rows of every shard are also reduced against all queries and
against all references (a subsample's measured error), returned as :attr:`GridResult.probe`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from distcur.distributed.tasks import RayTasks
from distcur.progress import bar

EXECUTORS = ("tasks", "ray-data")
DEFAULT_EXECUTOR = "tasks"
# Errors a Ray Data block reports back as data, raised on the driver with their own type (as the task grid's are).
BLOCK_ERRORS: tuple[type[BaseException], ...] = (ValueError, FloatingPointError)


@dataclass
class GridResult:
    """``results``: ``write``'s return per block, in block order; ``probe``: (probe rows reduced
    against every shard's queries, against every shard's references), or None; ``tasks``: how many
    tasks of each kind ran (for the caller's manifest)."""

    results: list
    probe: tuple[np.ndarray, np.ndarray] | None
    tasks: dict[str, int] = field(default_factory=dict)


def _points(block: np.ndarray | pa.Table) -> np.ndarray:
    """The points [rows, d] of a shard: an array (task grid) or a query-block table's ``y`` (Ray Data)."""
    if isinstance(block, np.ndarray):
        return block
    y = block.column("y").combine_chunks()
    return y.flatten().to_numpy().reshape(len(y), y.type.list_size)


def _pair(block_fn: Callable, queries, refs, h: float) -> np.ndarray:
    return block_fn(_points(queries), _points(refs), h)


def _reduce(combine: Callable, *partials: np.ndarray) -> np.ndarray:
    return combine(list(partials))


class _Grid(RayTasks):
    """The grid executors are Ray-task executors (``start``, ``put``, ``map``, ``submit`` for the
    stage's own per-shard work) with one more verb, ``grid``."""

    name = ""

    def _probe(self, ray, block_fn, probe_refs: list, query_refs: list, ref_blocks: list, h: float):
        probe = ray.put(np.concatenate(ray.get(probe_refs)))
        pair = ray.remote(_pair)
        exact = ray.get([pair.remote(block_fn, probe, q, h) for q in query_refs])
        approx = ray.get([pair.remote(block_fn, probe, r, h) for r in ref_blocks])
        return exact, approx


class TaskGrid(_Grid):
    """The grid as plain Ray tasks."""

    name = "tasks"

    def grid(self, load: Callable, loads: Sequence[tuple], block_fn: Callable, combine: Callable, write: Callable,
             bandwidths: Sequence[float], refs: str = "own", probe_bandwidth: float | None = None,
             desc: str = "blocks") -> GridResult:
        import ray

        blocks = [self.submit(load, *args, num_returns=4) for args in loads]
        query_refs = [b[0] for b in blocks]
        ref_blocks = [b[2] for b in blocks] if refs == "subsample" else query_refs
        pair, reduce = ray.remote(_pair), ray.remote(_reduce)
        pending = []
        for i, (q_i, carry_i, _, _) in enumerate(blocks):
            reduced = [reduce.remote(combine, *[pair.remote(block_fn, q_i, r, h) for r in ref_blocks])
                       for h in bandwidths]
            pending.append(self.submit(write, i, carry_i, *reduced))
        with bar(total=len(pending), desc=desc, unit="block") as progress:
            remaining = list(pending)
            while remaining:
                ready, remaining = ray.wait(remaining, num_returns=1)
                progress.update(len(ready))
        results = ray.get(pending)
        probe = None
        if probe_bandwidth is not None:
            exact, approx = self._probe(ray, block_fn, [b[3] for b in blocks], query_refs, ref_blocks,
                                        probe_bandwidth)
            probe = (combine(exact), combine(approx))
        k = len(blocks)
        tasks = {"load": k, "pairs": k * len(ref_blocks) * len(bandwidths), "combine": k * len(bandwidths)}
        return GridResult(results, probe, tasks)


def _load_block(load: Callable, block: int, *args):
    """``load(*args)`` for the Ray Data path: (query-block table, reference rows, probe rows).

    The table (one row per query: ``block``, the carry columns, ``y`` the point as a fixed-size
    float32 list) is at once a block of the dataset of queries and, with ``refs="own"``, a reference
    shard: the object store holds one copy of each shard's points."""
    y, carry, refs, probe = load(*args)
    points = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(y).ravel(), pa.float32()), y.shape[1])
    table = pa.Table.from_arrays([pa.array(np.full(len(y), block, np.int64)), points], names=["block", "y"])
    for name in carry.column_names:
        table = table.append_column(name, carry.column(name))
    return table, refs, probe


def _score_block(batch: pa.Table, write: Callable, ref_blocks: list, block_fn: Callable, combine: Callable,
                 bandwidths: Sequence[float]) -> pa.Table:
    """One query block of the Ray Data path: its partials against every reference shard, fetched one
    at a time, reduced per bandwidth and written by ``write``; returns one row (block, pickled
    ``write`` result, error type, message)."""
    import ray

    blocks = np.unique(batch.column("block").to_numpy())
    if len(blocks) != 1:  # the memory bound: one query block per call (batch_size=None: Ray Data's whole block)
        raise RuntimeError(f"Ray Data batch spans query blocks {blocks.tolist()}; expected exactly one")
    i = int(blocks[0])
    try:
        y = _points(batch)
        partials: list[list[np.ndarray]] = [[] for _ in bandwidths]
        for ref in ref_blocks:
            r = _points(ray.get(ref))  # this block + one reference shard: never more than two shards
            for out, h in zip(partials, bandwidths):
                out.append(block_fn(y, r, h))
            del r
        carry = batch.drop_columns(["block", "y"])
        result = write(i, carry, *[combine(p) for p in partials])
        out = (pickle.dumps(result), "", "")
    except BLOCK_ERRORS as e:
        out = (b"", type(e).__name__, str(e))
    return pa.table({"block": [i], "result": [out[0]], "error": [out[1]], "message": [out[2]]})


class RayDataGrid(_Grid):
    """The grid's reductions on Ray Data: a dataset of query blocks, one map task per block."""

    name = "ray-data"

    def grid(self, load: Callable, loads: Sequence[tuple], block_fn: Callable, combine: Callable, write: Callable,
             bandwidths: Sequence[float], refs: str = "own", probe_bandwidth: float | None = None,
             desc: str = "blocks") -> GridResult:
        import ray
        import ray.data

        load_task = ray.remote(num_returns=3)(_load_block)
        blocks = [load_task.remote(load, i, *args) for i, args in enumerate(loads)]
        tables = [b[0] for b in blocks]
        ref_blocks = [b[1] for b in blocks] if refs == "subsample" else tables
        ctx = ray.data.DataContext.get_current()
        bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # distcur's own bar below
        errors = {e.__name__: e for e in BLOCK_ERRORS}
        try:
            ds = ray.data.from_arrow_refs(tables).map_batches(
                _score_block, batch_size=None, batch_format="pyarrow", zero_copy_batch=True, num_cpus=1,
                fn_kwargs={"write": write, "ref_blocks": ref_blocks, "block_fn": block_fn, "combine": combine,
                           "bandwidths": list(bandwidths)})
            results: dict[int, Any] = {}
            with bar(total=len(tables), desc=f"{desc} (Ray Data)", unit="block") as progress:
                for row in ds.iter_rows():
                    if row["error"]:
                        raise errors[row["error"]](row["message"])
                    results[int(row["block"])] = pickle.loads(row["result"])
                    progress.update(1)
        finally:
            ctx.enable_progress_bars = bars
        if sorted(results) != list(range(len(tables))):
            raise RuntimeError(f"Ray Data pass returned blocks {sorted(results)}; expected 0..{len(tables) - 1}")
        probe = None
        if probe_bandwidth is not None:
            exact, approx = self._probe(ray, block_fn, [b[2] for b in blocks], tables, ref_blocks, probe_bandwidth)
            probe = (combine(exact), combine(approx))
        return GridResult([results[i] for i in range(len(tables))], probe,
                          {"load": len(tables), "ray_data_query_blocks": len(tables)})


def grid_executor(name: str | None = None, address: str | None = None) -> TaskGrid | RayDataGrid:
    """The executor called ``name`` (``tasks``, default, or ``ray-data``) for a Ray at ``address``."""
    name = DEFAULT_EXECUTOR if name is None else name
    if name not in EXECUTORS:
        raise ValueError(f"unknown grid executor {name!r}: expected one of {EXECUTORS}")
    return (TaskGrid if name == "tasks" else RayDataGrid)(address)

