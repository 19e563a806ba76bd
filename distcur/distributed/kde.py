"""IWR on Ray: exact KDE partial sums over a grid of query blocks x reference shards.

The prior's embedding tables are cut into ``K`` row ranges (shards) from Parquet metadata alone.
Pass 1 (K tasks): streamed moments of each shard -> the prior's whitening (merged on the driver,
O(d^2)). Pass 2 (K tasks): each task reads its own shard, puts its prior-whitened block in the
object store (plus its rows of the subsample / probe sets) and computes the shard's target-KDE
log-sums against the (small) target set; with ``kernel="per-set"`` it whitens its shard a second
time, by the target's covariance, for that sum only, so no second whitened copy of the prior
exists anywhere. Pass 3: task (i, k) computes the partial log-sums of query block i against
reference shard k; a combine task per block reduces its K partials by logsumexp, and a write
task turns block i into a Parquet part of the scores table. No task ever holds more than two
shards; the driver holds only object references, the whitenings and the target set.

``executor="ray-data"`` runs pass 3 on Ray Data instead: each load task returns its shard as one
Arrow table (ids, whitened ``y``, target log-sums), the tables are a dataset of query blocks
(``ray.data.from_arrow_refs``), and one ``map_batches`` task per block (``batch_size=None``: the
whole block; :func:`_score_block` refuses a batch spanning two) fetches the reference shards (the
same tables in exact mode, the subsample rows otherwise) one at a time with ``ray.get``,
logsumexp-combines the partials exactly as the grid's combine task does and writes the block's
part: the same bits, the same two-shard bound, Ray Data's retries on a lost node.

Subsample mode replaces the prior references by a uniform random subsample of ``s`` prior points
(without replacement: the KDE mean is unbiased for the exact one). Its error is reported two ways:
the per-point relative standard deviation of the density estimate from the subsample's own second
moment (the kernel at h/sqrt(2) gives sum K^2), and the measured relative error against the exact
density on a probe set of prior points.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distcur.distributed.session import ensure_ray
from distcur.methods import KDE_EXECUTORS
from distcur.progress import bar
from distcur.schema import EMBEDDING_SCHEMA, SCORE_SCHEMA, describe_row, list_column_to_numpy
from distcur.score.kde import (
    Whitening,
    check_points,
    combine_log_partials,
    log_kde_partial_sums,
    moments,
    whitening_from_moments,
)
from distcur.store import Manifest, Store

ROWS_PER_SHARD = 100_000
PROBE_POINTS = 256
SEED = 0
# How pass 3 runs: "tasks", a grid of plain Ray tasks (query block x reference shard, a combine and a
# write task per block), or "ray-data", a Ray Data dataset of the query blocks mapped one task per block.
EXECUTORS = KDE_EXECUTORS
DEFAULT_EXECUTOR = "tasks"
ID_COLUMNS = ("source", "episode", "step")


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of one Parquet file of table ``key``."""

    key: str
    path: str
    start: int
    stop: int


def plan_shards(store: Store, keys: list[str], num_shards: int | None) -> tuple[list[list[RowRange]], int]:
    """Cut the tables ``keys`` into contiguous row-range shards of near-equal size: (shards, total rows)."""
    files: list[tuple[str, str, int]] = []
    for key in keys:
        if store.manifest(key) is None:
            raise FileNotFoundError(f"prior embeddings {store.uri_of(key)} are not a committed table")
        for path in store.files(key):
            files.append((key, path, pq.ParquetFile(store.fs.open_input_file(path)).metadata.num_rows))
    total = sum(n for _, _, n in files)
    if total < 2:
        raise ValueError(f"prior embeddings {keys} hold {total} rows; need at least 2")
    k = num_shards if num_shards is not None else max(1, math.ceil(total / ROWS_PER_SHARD))
    k = min(k, total)
    bounds = np.linspace(0, total, k + 1).round().astype(np.int64)
    shards: list[list[RowRange]] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        ranges, offset = [], 0
        for key, path, n in files:
            lo, hi = max(a, offset), min(b, offset + n)
            if lo < hi:
                ranges.append(RowRange(key, path, int(lo - offset), int(hi - offset)))
            offset += n
        shards.append(ranges)
    return shards, total


def read_ranges(store: Store, ranges: list[RowRange], columns: list[str]) -> pa.Table:
    """The rows of ``ranges``, reading only the Parquet row groups that overlap them."""
    parts = []
    for rr in ranges:
        pf = pq.ParquetFile(store.fs.open_input_file(rr.path))
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{store.uri_of(rr.key)} ({rr.path}): missing columns {missing}; "
                             f"expected the embedding schema {EMBEDDING_SCHEMA.names}")
        offset, groups, first = 0, [], None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < rr.stop and offset + n > rr.start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups, columns=columns)
        parts.append(table.slice(rr.start - first, rr.stop - rr.start))
    return pa.concat_tables(parts)


def _z(store: Store, table: pa.Table, ranges: list[RowRange]) -> np.ndarray:
    where = ", ".join(sorted({r.key for r in ranges}))
    z = list_column_to_numpy(table.column("z"), f"column 'z' of {where}")
    if not np.isfinite(z).all():
        row, col = np.argwhere(~np.isfinite(z))[0]
        # the moments round reads only z: the keys are read again here, on the error path alone
        ids = table if "step" in table.column_names else read_ranges(store, ranges, list(ID_COLUMNS))
        keys = tuple(ids.column(c).to_numpy(zero_copy_only=False) for c in ID_COLUMNS)
        raise ValueError(f"{where}: non-finite z[{col}] at {describe_row(int(row), keys)}")
    return z


def _shard_moments(store: Store, ranges: list[RowRange]):
    z = _z(store, read_ranges(store, ranges, ["z"]), ranges)
    return moments(z) + (sorted({r.key for r in ranges}),)


def _load_shard(store: Store, ranges: list[RowRange], white: Whitening, target_white: Whitening | None,
                target_y: np.ndarray, h_t: float, sub_local: np.ndarray, probe_local: np.ndarray):
    """(whitened z, ids table, whitened subsample rows, whitened probe rows, target-KDE log-sums) of one shard.

    ``white``: the prior's whitening; ``target_white``: the target KDE's own (None: the prior's);
    ``target_y`` [n_t, d]: the target points whitened by it; the log-sums are [rows of the shard].
    """
    table = read_ranges(store, ranges, list(ID_COLUMNS) + ["z"])
    z = _z(store, table, ranges)
    y = white.apply(z)
    lse_t = log_kde_partial_sums(y if target_white is None else target_white.apply(z), target_y, h_t)
    return y, table.select(list(ID_COLUMNS)), y[sub_local], y[probe_local], lse_t


def _partial(queries: np.ndarray | pa.Table, refs: np.ndarray | pa.Table, h: float) -> np.ndarray:
    return log_kde_partial_sums(_points(queries), _points(refs), h)


def _points(block: np.ndarray | pa.Table) -> np.ndarray:
    """The whitened points [rows, d] of a shard: an array (task grid) or a query-block table's ``y`` (Ray Data)."""
    if isinstance(block, np.ndarray):
        return block
    y = block.column("y").combine_chunks()
    return y.flatten().to_numpy().reshape(len(y), y.type.list_size)


def _load_block(store: Store, ranges: list[RowRange], white: Whitening, target_white: Whitening | None,
                target_y: np.ndarray, h_t: float, sub_local: np.ndarray, probe_local: np.ndarray, block: int):
    """:func:`_load_shard` for the Ray Data path: (query-block table, subsample rows, probe rows).

    The table (one row per prior step: block, source, episode, step, ``y`` the whitened point as a
    fixed-size list, lse_target) is at once a block of the Ray Data dataset of queries and, in exact
    mode, a reference shard: the object store holds one whitened copy of each shard.
    """
    y, ids, sub, probe, lse_t = _load_shard(store, ranges, white, target_white, target_y, h_t, sub_local, probe_local)
    points = pa.FixedSizeListArray.from_arrays(pa.array(y.ravel(), pa.float32()), y.shape[1])
    table = pa.Table.from_arrays(
        [pa.array(np.full(len(y), block, np.int64)), *ids.columns, points, pa.array(lse_t, pa.float64())],
        names=["block", *ids.column_names, "y", "lse_target"])
    return table, sub, probe


def _combine(*partials: np.ndarray) -> np.ndarray:
    return combine_log_partials(list(partials))


def _write_scores(store: Store, rel: str, ids: pa.Table, lse_target: np.ndarray, lse_prior: np.ndarray,
                  const: float, lse_prior_sq: np.ndarray | None, sub_n: int, prior_n: int):
    """Write one part of the scores table; returns (rel, rows, logw summary, rel-std sample)."""
    log_w = lse_target - lse_prior + const
    if not np.isfinite(log_w).all():
        bad = int(np.argmax(~np.isfinite(log_w)))
        raise FloatingPointError(
            f"IWR produced a non-finite score {log_w[bad]} at source={ids.column('source')[bad]}, "
            f"episode={ids.column('episode')[bad]}, step={ids.column('step')[bad]}"
        )
    table = pa.Table.from_arrays(
        [ids.column("source"), ids.column("episode"), ids.column("step"), pa.array(log_w, pa.float64()),
         pa.array(["iwr"] * len(log_w), pa.string())],
        schema=SCORE_SCHEMA,
    )
    store.write_parquet(rel, table)
    rel_std = None
    if lse_prior_sq is not None:
        rel_std = relative_std(lse_prior, lse_prior_sq, sub_n, prior_n)
        rng = np.random.default_rng(len(rel_std))
        rel_std = np.concatenate([rng.choice(rel_std, min(1000, len(rel_std)), replace=False), [rel_std.max()]])
    return rel, len(log_w), (float(log_w.min()), float(log_w.max()), float(log_w.sum())), rel_std


def _pass3_task_grid(ray, store: Store, data_dir: str, loads: list[tuple], h: float, const: float, s: int, n: int):
    """Pass 3 as a grid of Ray tasks: (results in block order, y refs, reference refs, probe refs)."""
    load = ray.remote(num_returns=5)(_load_shard)
    blocks = [load.remote(*args) for args in loads]
    y_refs = [b[0] for b in blocks]
    partial, combine, write = ray.remote(_partial), ray.remote(_combine), ray.remote(_write_scores)
    ref_blocks = [b[2] for b in blocks] if s else y_refs
    pending = []
    for i, (y_i, ids_i, _, _, lse_t) in enumerate(blocks):
        lse_p = combine.remote(*[partial.remote(y_i, r, h) for r in ref_blocks])
        lse_sq = combine.remote(*[partial.remote(y_i, r, h / math.sqrt(2)) for r in ref_blocks]) if s else None
        rel = f"{data_dir}/part-{i:05d}.parquet"
        pending.append(write.remote(store, rel, ids_i, lse_t, lse_p, const, lse_sq, max(s, 1), n))
    with bar(total=len(pending), desc="IWR log-KDE blocks", unit="block") as progress:
        remaining = list(pending)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            progress.update(len(ready))
    return ray.get(pending), y_refs, ref_blocks, [b[3] for b in blocks]


# Errors a Ray Data block reports back as data, raised on the driver with their own type (as the task grid's are).
_BLOCK_ERRORS = {e.__name__: e for e in (ValueError, FloatingPointError)}


def _score_block(batch: pa.Table, store: Store, data_dir: str, ref_blocks: list, h: float, const: float, s: int,
                 n: int) -> pa.Table:
    """One query block of the Ray Data path: its log-sums against every reference shard, fetched one at a
    time, logsumexp-combined and written as part ``block`` of the scores table; returns one row (block,
    pickled :func:`_write_scores` result, error type, message)."""
    import pickle

    import ray

    blocks = np.unique(batch.column("block").to_numpy())
    if len(blocks) != 1:  # the memory bound: one query block per call (batch_size=None: Ray Data's whole block)
        raise RuntimeError(f"IWR Ray Data batch spans query blocks {blocks.tolist()}; expected exactly one")
    i = int(blocks[0])
    try:
        y = _points(batch)
        partials, partials_sq = [], []
        for ref in ref_blocks:
            r = _points(ray.get(ref))  # this block + one reference shard: never more than two shards
            partials.append(log_kde_partial_sums(y, r, h))
            if s:
                partials_sq.append(log_kde_partial_sums(y, r, h / math.sqrt(2)))
            del r
        ids = batch.select(list(ID_COLUMNS))
        result = _write_scores(store, f"{data_dir}/part-{i:05d}.parquet", ids, batch.column("lse_target").to_numpy(),
                               _combine(*partials), const, _combine(*partials_sq) if s else None, max(s, 1), n)
        out = (pickle.dumps(result), "", "")
    except tuple(_BLOCK_ERRORS.values()) as e:
        out = (b"", type(e).__name__, str(e))
    return pa.table({"block": [i], "result": [out[0]], "error": [out[1]], "message": [out[2]]})


def _pass3_ray_data(ray, store: Store, data_dir: str, loads: list[tuple], h: float, const: float, s: int, n: int):
    """Pass 3 on Ray Data: the query blocks (one per shard, in the object store) as a dataset, one map task
    per block against every reference shard. Returns what :func:`_pass3_task_grid` does."""
    import pickle

    import ray.data

    load = ray.remote(num_returns=3)(_load_block)
    blocks = [load.remote(*args, i) for i, args in enumerate(loads)]
    tables = [b[0] for b in blocks]
    ref_blocks = [b[1] for b in blocks] if s else tables
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # distcur's own bar below
    try:
        ds = ray.data.from_arrow_refs(tables).map_batches(
            _score_block, batch_size=None, batch_format="pyarrow", zero_copy_batch=True, num_cpus=1,
            fn_kwargs={"store": store, "data_dir": data_dir, "ref_blocks": ref_blocks, "h": h, "const": const,
                       "s": s, "n": n})
        results: dict[int, tuple] = {}
        with bar(total=len(tables), desc="IWR log-KDE blocks (Ray Data)", unit="block") as progress:
            for row in ds.iter_rows():
                if row["error"]:
                    raise _BLOCK_ERRORS[row["error"]](row["message"])
                results[int(row["block"])] = pickle.loads(row["result"])
                progress.update(1)
    finally:
        ctx.enable_progress_bars = bars
    if sorted(results) != list(range(len(tables))):
        raise RuntimeError(f"IWR Ray Data pass returned blocks {sorted(results)}; expected 0..{len(tables) - 1}")
    return [results[i] for i in range(len(tables))], tables, ref_blocks, [b[2] for b in blocks]


def relative_std(lse: np.ndarray, lse_sq: np.ndarray, s: int, n: int) -> np.ndarray:
    """Relative std of the subsample density estimate mean_j K_j from s of n references.

    ``lse`` = log sum_j K_j and ``lse_sq`` = log sum_j K_j^2 over the subsample; the finite-population
    variance of a mean of s draws without replacement is (1 - s/n) sigma^2 / s.
    """
    second_over_first_sq = np.exp(lse_sq - 2 * lse + math.log(s))  # E[K^2] / E[K]^2
    sigma2_rel = np.maximum(second_over_first_sq - 1.0, 0.0) * s / max(s - 1, 1)
    return np.sqrt((1.0 - s / n) * sigma2_rel / s)


def distributed_iwr(store: Store, prior_keys: list[str], target_key: str, out_key: str, bandwidth: str | float,
                    mode: str, kernel: str, num_shards: int | None, subsample: int | None,
                    address: str | None, executor: str = DEFAULT_EXECUTOR) -> Manifest:
    """See :func:`distcur.score.iwr.run_iwr` (the public entry point, which validates arguments)."""
    import ray

    from distcur.score.iwr import log_weight_constant, resolve_bandwidths, target_whitening

    config = {"method": "iwr", "prior_keys": prior_keys, "target_key": target_key, "bandwidth": bandwidth,
              "mode": mode, "num_shards": num_shards, "subsample": subsample, "seed": SEED}
    # Keys absent from older manifests only where they change the numbers, so those stay current.
    if kernel != "shared-prior":
        config["kernel"] = kernel
    if bandwidth == "likelihood":
        config["heldout_folds"] = "episode"
    inputs = {k: store.input_fingerprint(k) for k in prior_keys}
    inputs[target_key] = store.input_fingerprint(target_key)
    if store.is_done(out_key, "score", config, inputs):
        return store.manifest(out_key)
    t0 = time.time()
    target_tab = store.read_table(target_key, columns=["source", "episode", "step", "z"])
    if target_tab.num_rows == 0:
        raise ValueError(f"target embeddings {store.uri_of(target_key)} are empty: nothing to retrieve for")
    target_z = list_column_to_numpy(target_tab.column("z"), f"column 'z' of {target_key}")
    check_points(target_z, f"target embeddings {target_key}",
                 keys=tuple(target_tab.column(c).to_numpy(zero_copy_only=False) for c in ID_COLUMNS))
    shards, n = plan_shards(store, prior_keys, num_shards)
    k = len(shards)

    ensure_ray(address)
    moments_task = ray.remote(_shard_moments)
    stats = ray.get([moments_task.remote(store, s) for s in shards])
    dims = {st[1].shape[0] for st in stats}
    if len(dims) > 1:
        by_dim = {st[1].shape[0]: st[3] for st in stats}
        raise ValueError(f"prior embeddings have mismatched dims: {by_dim}")
    d = dims.pop()
    if target_z.shape[1] != d:
        raise ValueError(f"target embeddings {target_key} have dim {target_z.shape[1]} but the prior "
                         f"embeddings {prior_keys} have dim {d}")
    white = whitening_from_moments(n, sum(st[1] for st in stats), sum(st[2] for st in stats),
                                   name=f"prior embeddings {prior_keys}")
    t_white = target_whitening(kernel, target_z, white, f"target embeddings {target_key}")
    target_y = t_white.apply(target_z)
    episodes = [f"{src}/{ep}" for src, ep in zip(target_tab.column("source").to_pylist(),
                                                target_tab.column("episode").to_pylist(), strict=True)]
    h_t, h_p, bw_info = resolve_bandwidths(bandwidth, target_y, n, np.asarray(episodes))

    rng = np.random.default_rng(SEED)
    s = min(int(subsample), n) if mode == "subsample" else 0
    sub_idx = np.sort(rng.choice(n, s, replace=False)) if s else np.zeros(0, np.int64)
    probe_idx = np.sort(rng.choice(n, min(PROBE_POINTS, n), replace=False)) if s else np.zeros(0, np.int64)
    starts = np.cumsum([0] + [sum(r.stop - r.start for r in sh) for sh in shards])

    def local(idx: np.ndarray, i: int) -> np.ndarray:
        return idx[(idx >= starts[i]) & (idx < starts[i + 1])] - starts[i]

    own, target_ref = None if t_white is white else t_white, ray.put(target_y)
    loads = [(store, sh, white, own, target_ref, h_t, local(sub_idx, i), local(probe_idx, i))
             for i, sh in enumerate(shards)]
    num_refs = s if s else n
    writer = store.writer(out_key, stage="score", config=config, inputs=inputs)
    const = log_weight_constant(h_t, h_p, len(target_y), num_refs, d, t_white, white)
    run_pass3 = _pass3_ray_data if executor == "ray-data" else _pass3_task_grid
    try:
        results, y_refs, ref_blocks, probe_refs = run_pass3(ray, store, writer.data_dir, loads, h_p, const, s, n)
    except BaseException:
        writer.abort()
        raise
    writer.add_files([r[0] for r in results], sum(r[1] for r in results), schema=SCORE_SCHEMA)
    metadata = {
        "method": "iwr",
        "kernel": kernel,
        "whitening": ("prior sample covariance (ddof=1), shared by both KDEs" if kernel == "shared-prior"
                      else "each KDE its own set's sample covariance (ddof=1)"),
        "bandwidth": bw_info,
        "bandwidth_at_grid_edge": bw_info.get("at_grid_edge"),
        "dim": d,
        "num_prior": n,
        "num_target": len(target_y),
        "num_shards": k,
        "executor": executor,
        "tasks": ({"load_and_target_sums": k, "partial_sums": k * len(ref_blocks) * (2 if s else 1),
                   "combine": k * (2 if s else 1)} if executor == "tasks"
                  else {"load_and_target_sums": k, "ray_data_query_blocks": k}),
        "log_w": {"min": min(r[2][0] for r in results), "max": max(r[2][1] for r in results),
                  "mean": sum(r[2][2] for r in results) / n},
    }
    if s:
        metadata["subsample"] = _subsample_error(ray, results, probe_refs, y_refs, ref_blocks, h_p, s, n)
    metadata["compute_s"] = round(time.time() - t0, 3)
    return writer.commit(metadata)


def _subsample_error(ray, results, probe_refs, y_refs, ref_blocks, h: float, s: int, n: int) -> dict:
    """Estimated (subsample variance) and measured (probe set vs exact) error of the prior density."""
    rel_std = np.concatenate([r[3] for r in results])
    probe = np.concatenate(ray.get(probe_refs))
    probe_ref = ray.put(probe)
    partial = ray.remote(_partial)
    exact = combine_log_partials(ray.get([partial.remote(probe_ref, r, h) for r in y_refs])) - math.log(n)
    approx = combine_log_partials(ray.get([partial.remote(probe_ref, r, h) for r in ref_blocks])) - math.log(s)
    rel_err = np.abs(np.expm1(approx - exact))
    return {
        "size": s,
        "fraction": s / n,
        "seed": SEED,
        "estimated_relative_std": {"median": float(np.median(rel_std)), "p90": float(np.quantile(rel_std, 0.9)),
                                   "max": float(rel_std.max())},
        "probe_points": len(probe),
        "measured_relative_error": {"median": float(np.median(rel_err)), "p90": float(np.quantile(rel_err, 0.9)),
                                    "max": float(rel_err.max())},
        "measured_log_error_rms": float(np.sqrt(np.mean((approx - exact) ** 2))),
    }
