"""The score stage: every scorer of :mod:`distcur.methods` over the prior, committed at ``scores/<run>``.

Every method writes ``scores/<run>`` (:data:`distcur.schema.SCORE_SCHEMA`, one row per prior
step, higher = more useful for the target) with a manifest, and is skipped when a committed
output has the same config and input fingerprints (:func:`distcur.stages.output.commit_output`).
The maths is :mod:`distcur.score`; this module reads and writes the store and hands its per-part
work to an executor from :mod:`distcur.distributed` (Ray tasks by default). Each task reads one
part (a file named by the input table's manifest), streams it in batches and writes its own
immutable output part; the driver only ever holds small things (the target set, per-part
bounds, STRAP's matches).

- ``sr`` / ``ar`` / ``br``: two rounds. Round 1 computes ``-min distance to the target set`` per
  part and reports its min and max; round 2 min-max scales with the global bounds and writes.
  Features: raw state (``sr``), raw action (``ar``) from the step tables; the encoder's
  embedding (``br``, default ``vae``) from ``embeddings/<encoder>/``.
- ``strap``: per part, count rows per episode; match the target segments against the episodes
  that lie wholly in one part there, and return the rows of episodes split across parts to the
  driver, which matches them; keep the top k; a last round writes step scores.
- ``random``: one round, hash-based uniform scores.
- ``iwr``: :func:`run_iwr`, exact KDE partial sums over a grid of query blocks x reference shards
  (below), on :mod:`distcur.distributed.kde`'s task grid or Ray Data executor.

IWR: the prior's embedding tables are cut into ``K`` row ranges (shards) from Parquet metadata
alone. Pass 1 (K tasks): streamed moments of each shard -> the prior's whitening (merged on the
driver, O(d^2)). Pass 2 (K tasks): each task reads its own shard, whitens it (plus its rows of the
subsample / probe sets) and computes the shard's target-KDE log-sums against the (small) target
set; with ``kernel="per-set"`` it whitens its shard a second time, by the target's covariance,
for that sum only, so no second whitened copy of the prior exists anywhere. Pass 3: the partial
log-sums of each query block against every reference shard (the block function
:func:`distcur.score.kde.log_kde_partial_sums`), reduced by logsumexp, and each block written as
a Parquet part of the scores table. Subsample mode replaces the prior references by a uniform
random subsample of ``s`` prior points (without replacement: the KDE mean is unbiased for the
exact one); its error is reported two ways: the per-point relative standard deviation of the
density estimate from the subsample's own second moment (the kernel at h/sqrt(2) gives
sum K^2), and the measured relative error against the exact density on a probe set.

Use :func:`run` with a :class:`ScoreConfig` for all of them.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distcur.data import (
    default_prior_sources,
    embeddings_key,
    load_steps,
    scores_key,
    steps_key,
    target_source,
)
from distcur.methods import IwrConfig, RandomConfig, StrapConfig, names, scorer_config
from distcur.schema import EMBEDDING_SCHEMA, SCORE_SCHEMA, describe_row, list_column_to_numpy
from distcur.score import strap as strap_lib
from distcur.score.iwr import (
    log_weight_constant,
    rel_std_sample,
    relative_std,
    resolve_bandwidths,
    subsample_error,
    target_whitening,
)
from distcur.score.kde import (
    Whitening,
    check_points,
    combine_log_partials,
    log_kde_partial_sums,
    moments,
    whitening_from_moments,
)
from distcur.score.nearest import NEAREST_FEATURES, check_features, min_distances, minmax_scale
from distcur.score.random import random_scores
from distcur.stages.output import commit_output
from distcur.store import Manifest, Store

log = logging.getLogger(__name__)

SCORE_METHODS = names("scorer")
STAGE = "score"
READ_BATCH = 65_536
ROWS_PER_SHARD = 100_000
PROBE_POINTS = 256
SEED = 0
ID_COLUMNS = ("source", "episode", "step")


@dataclass
class ScoreConfig:
    """One score run: ``method`` scores every step of ``prior_sources`` (default: every non-target
    source) against the target demos of ``target``, written at ``scores/<run>``. ``scorer``: the
    method's options, its config class in :mod:`distcur.methods` (a mapping is checked against it:
    an option the method does not take is an error)."""

    method: str = field(default="", metadata={"help": "scorer", "choices": SCORE_METHODS})
    target: str = field(default="", metadata={"help": "target task name (its demos are source target-<task>)"})
    run: str = field(default="", metadata={"help": "output run name: writes scores/<run>"})
    prior_sources: list[str] | None = field(default=None, metadata={"help": "prior sources (default: all non-target)"})
    scorer: Any = None

    def __post_init__(self) -> None:
        if not self.method:
            raise ValueError(f"ScoreConfig.method is required (--method): one of {SCORE_METHODS}")
        if self.method not in SCORE_METHODS:
            raise ValueError(f"ScoreConfig.method: unknown score method {self.method!r}; expected one of {SCORE_METHODS}")
        for name in ("target", "run"):
            if not getattr(self, name):
                raise ValueError(f"ScoreConfig.{name} is required (--{name})")
        expected = scorer_config(self.method).__class__
        if self.scorer is None or isinstance(self.scorer, dict):
            self.scorer = scorer_config(self.method, **(self.scorer or {}))
        elif type(self.scorer) is not expected:
            raise ValueError(f"ScoreConfig.scorer: method {self.method!r} takes a {expected.__name__}, "
                             f"got {type(self.scorer).__name__}")


def run(store: Store, config: ScoreConfig, address: str | None = None, executor: Any = None) -> Manifest:
    """Score every prior step for ``config.target`` with ``config.method``; commit ``scores/<run>``.

    ``executor``: :class:`distcur.distributed.tasks.RayTasks` for sr / ar / br / strap / random, a
    grid executor of :mod:`distcur.distributed.kde` for iwr (default: the one ``scorer.executor``
    names, ``tasks`` unless told; the same scores either way); ``address``: the Ray to join.
    """
    out_key, opts = scores_key(config.run), config.scorer
    if config.method in NEAREST_FEATURES:
        return run_nearest(store, config.method, config.target, out_key, config.prior_sources,
                           encoder=getattr(opts, "encoder", "vae"), block=opts.block,
                           executor=executor or _tasks(address))
    if config.method == "strap":
        return run_strap(store, config.target, out_key, opts, config.prior_sources, executor or _tasks(address))
    if config.method == "random":
        return run_random(store, config.target, out_key, opts, config.prior_sources, executor or _tasks(address))
    sources = default_prior_sources(store, config.prior_sources)
    return run_iwr(store, [embeddings_key(opts.encoder, s) for s in sources],
                   embeddings_key(opts.encoder, target_source(config.target)), out_key, opts, address=address,
                   executor=executor)


def _tasks(address: str | None):
    from distcur.distributed.tasks import RayTasks

    return RayTasks(address)


# -- helpers ---------------------------------------------------------------------------------------
def _iter_part(store: Store, path: str, columns: list[str]):
    pf = pq.ParquetFile(store.fs.open_input_file(path))
    yield from pf.iter_batches(batch_size=READ_BATCH, columns=columns)


def _keys(rb: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(rb.column("source").to_pylist(), dtype=object),
            rb.column("episode").to_numpy(zero_copy_only=False).astype(np.int64),
            rb.column("step").to_numpy(zero_copy_only=False).astype(np.int32))


def _score_table(source: np.ndarray, episode: np.ndarray, step: np.ndarray, score: np.ndarray,
                 method: str) -> pa.Table:
    if not np.isfinite(score).all():  # a scorer bug, never a silent NaN in the store
        row = int(np.argmin(np.isfinite(score)))
        raise ValueError(f"{method}: non-finite score at source={source[row]!r}, episode={episode[row]}, step={step[row]}")
    return pa.Table.from_arrays(
        [pa.array(source, pa.string()), pa.array(episode, pa.int64()), pa.array(step, pa.int32()),
         pa.array(score, pa.float64()), pa.array(np.full(len(score), method, dtype=object), pa.string())],
        schema=SCORE_SCHEMA,
    )


def _feature_dim(store: Store, key: str, column: str) -> int | None:
    for path in store.files(key):
        for rb in _iter_part(store, path, [column]):
            if rb.num_rows:
                return len(rb.column(0)[0])
    return None


def _parts(store: Store, keys: dict[str, str]) -> list[tuple[str, str]]:
    """[(source, file path)] over the tables ``keys`` = {source: table key}."""
    return [(src, path) for src, key in keys.items() for path in store.files(key)]


def _write_part(store: Store, rel: str, tables: list[pa.Table]) -> tuple[str, int]:
    """A task's score tables as one part at ``rel``: (rel, rows); an empty part writes nothing."""
    if not tables:
        return rel, 0
    table = pa.concat_tables(tables)
    store.write_parquet(rel, table)
    return rel, table.num_rows


def _add_parts(writer, results: list[tuple[str, int]]) -> None:
    """The parts the tasks wrote, (rel, rows) each; an empty prior still commits a readable, empty table."""
    rels = [r for r, _ in results]
    writer.add_files(rels, sum(n for _, n in results), SCORE_SCHEMA)
    if not rels:
        writer.write(SCORE_SCHEMA.empty_table())


# -- nearest (SR / AR / BR) --------------------------------------------------------------------------
def _nearest_raw_part(store: Store, path: str, column: str, target: np.ndarray, block: int):
    tables, lo, hi = [], np.inf, -np.inf
    for rb in _iter_part(store, path, ["source", "episode", "step", column]):
        if not rb.num_rows:
            continue
        feats = list_column_to_numpy(rb.column(column), column)
        source, episode, step = _keys(rb)
        try:
            raw = -min_distances(feats, target, block, prior_keys=(source, episode, step))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        lo, hi = min(lo, float(raw.min())), max(hi, float(raw.max()))
        tables.append(pa.table({"source": source, "episode": episode, "step": step, "raw": raw}))
    table = pa.concat_tables(tables) if tables else None
    return (lo, hi), table


def _scale_and_write(store: Store, rel: str, table: pa.Table | None, lo: float, hi: float, method: str):
    if table is None:
        return rel, 0
    scores = minmax_scale(table.column("raw").to_numpy(), lo, hi)
    source, episode, step = _keys(table)
    store.write_parquet(rel, _score_table(source, episode, step, scores, method))
    return rel, table.num_rows


# -- random -----------------------------------------------------------------------------------------
def _random_part(store: Store, path: str, rel: str, seed: int, level: str, horizon: int):
    tables = []
    for rb in _iter_part(store, path, ["source", "episode", "step"]):
        source, episode, step = _keys(rb)
        # one draw per cluster of the level, so a cluster's mean score is uniform whatever its size
        window = step if level == "step" else (step // horizon if level == "subtraj" else np.zeros_like(step))
        scores = np.empty(len(episode))
        for src in np.unique(source) if len(source) else []:
            rows = source == src
            scores[rows] = random_scores(str(src), episode[rows], window[rows], seed)
        tables.append(_score_table(source, episode, step, scores, "random"))
    return _write_part(store, rel, tables)


# -- STRAP ------------------------------------------------------------------------------------------
def _part_episodes(store: Store, path: str) -> np.ndarray:
    """The distinct episodes with rows in one part."""
    eps = [np.unique(rb.column(0).to_numpy()) for rb in _iter_part(store, path, ["episode"])]
    return np.unique(np.concatenate(eps)) if eps else np.zeros(0, np.int64)


def _read_embeddings(store: Store, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    episode, step, z = [], [], []
    for rb in _iter_part(store, path, ["episode", "step", "z"]):
        episode.append(rb.column("episode").to_numpy(zero_copy_only=False))
        step.append(rb.column("step").to_numpy(zero_copy_only=False))
        z.append(list_column_to_numpy(rb.column("z"), "z"))
    if not episode:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, 0), np.float32)
    return np.concatenate(episode), np.concatenate(step), np.concatenate(z)


def _strap_match_part(store: Store, path: str, source: str, segments: list[np.ndarray], split: np.ndarray):
    """Matches in the episodes wholly inside this part; rows of episodes split across parts."""
    episode, step, z = _read_embeddings(store, path)
    is_split = np.isin(episode, split)
    whole = ~is_split
    try:
        matches = strap_lib.match_episodes(segments, source, episode[whole], step[whole], z[whole])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return matches, (episode[is_split], step[is_split], z[is_split])


def _strap_write_part(store: Store, path: str, source: str, rel: str, kept: list, match_scores: list[float],
                      padding: int):
    tables = []
    for rb in _iter_part(store, path, ["source", "episode", "step"]):
        src, episode, step = _keys(rb)
        scores = strap_lib.step_scores_from_matches(source, episode, step, kept, match_scores, padding)
        tables.append(_score_table(src, episode, step, scores, "strap"))
    return _write_part(store, rel, tables)


# -- the scorers ------------------------------------------------------------------------------------
def run_nearest(store: Store, method: str, target_task: str, out_key: str, prior_sources: list[str] | None = None,
                encoder: str = "vae", block: int = 1024, executor: Any = None) -> Manifest:
    """SR / AR / BR scores of every prior step against the target demos of ``target_task``."""
    if method not in NEAREST_FEATURES:
        raise ValueError(f"run_nearest: method must be one of {sorted(NEAREST_FEATURES)}, got {method!r}")
    table_kind, column = NEAREST_FEATURES[method]
    sources = default_prior_sources(store, prior_sources)
    tsrc = target_source(target_task)
    tasks = executor or _tasks(None)

    def key_of(src: str) -> str:
        return steps_key(src) if table_kind == "steps" else embeddings_key(encoder, src)

    prior_keys = {s: key_of(s) for s in sources}
    inputs = {k: store.input_fingerprint(k) for k in [*prior_keys.values(), key_of(tsrc)]}
    config = {"method": method, "target": target_task, "prior_sources": sources, "block": block,
              **({"encoder": encoder} if table_kind == "embeddings" else {})}

    def produce(writer) -> dict:
        if table_kind == "steps":
            t = load_steps(store, [tsrc])
            target, target_keys = (t.state if column == "state" else t.action), (tsrc, t.episode, t.step)
        else:
            emb = store.read_table(key_of(tsrc), columns=["episode", "step", "z"])
            target = list_column_to_numpy(emb.column("z"), "z")
            target_keys = (tsrc, emb.column("episode").to_numpy(), emb.column("step").to_numpy())
        if len(target) == 0:
            raise ValueError(f"{method}: the target set {key_of(tsrc)} is empty; need at least one target step")
        for key in prior_keys.values():
            dim = _feature_dim(store, key, column)
            if dim is not None:
                check_features(np.zeros((0, dim)), target, f"{method}: {column} of {key} vs {key_of(tsrc)}",
                               target_keys=target_keys)
        tasks.start()
        target_ref = tasks.put(np.ascontiguousarray(target))
        bounds_refs, table_refs = [], []
        for _, path in _parts(store, prior_keys):
            b, t = tasks.submit(_nearest_raw_part, store, path, column, target_ref, block, num_returns=2)
            bounds_refs.append(b)
            table_refs.append(t)
        bounds = tasks.get(bounds_refs)
        lo = min((b[0] for b in bounds), default=0.0)
        hi = max((b[1] for b in bounds), default=0.0)
        results = tasks.get([tasks.submit(_scale_and_write, store, f"{writer.data_dir}/part-{i:05d}.parquet", t, lo,
                                          hi, method) for i, t in enumerate(table_refs)])
        _add_parts(writer, results)
        return {"method": method, "target": target_task, "raw_min": lo, "raw_max": hi,
                "target_rows": int(len(target))}

    return commit_output(store, out_key, STAGE, config, inputs, produce).manifest


def run_random(store: Store, target_task: str, out_key: str, options: RandomConfig | None = None,
               prior_sources: list[str] | None = None, executor: Any = None) -> Manifest:
    """Uniform random scores for every prior step (the target only names the run).

    ``options.level``: one draw per step, per sub-trajectory of ``horizon`` steps, or per episode
    (every step of the cluster gets it), so a selection at that level is a uniform draw of its
    clusters (per-step draws averaged over an episode would favour short episodes at both ends)."""
    opts = options or RandomConfig()
    seed, level, horizon = opts.seed, opts.level, opts.horizon
    sources = default_prior_sources(store, prior_sources)
    target_key = steps_key(target_source(target_task))
    if store.manifest(target_key) is None:  # the scores ignore it, but the run is named for it
        raise FileNotFoundError(f"random: --target {target_task!r} has no target demos at {store.uri_of(target_key)}")
    prior_keys = {s: steps_key(s) for s in sources}
    inputs = {k: store.input_fingerprint(k) for k in prior_keys.values()}
    config = {"method": "random", "target": target_task, "prior_sources": sources, "seed": seed}
    if level != "step":
        config.update(level=level, horizon=horizon)
    tasks = executor or _tasks(None)

    def produce(writer) -> dict:
        tasks.start()
        _add_parts(writer, tasks.map(_random_part, [
            (store, path, f"{writer.data_dir}/part-{i:05d}.parquet", seed, level, horizon)
            for i, (_, path) in enumerate(_parts(store, prior_keys))]))
        return {"method": "random", "target": target_task}

    return commit_output(store, out_key, STAGE, config, inputs, produce, quiet=True).manifest


def run_strap(store: Store, target_task: str, out_key: str, options: StrapConfig | None = None,
              prior_sources: list[str] | None = None, executor: Any = None) -> Manifest:
    """STRAP scores: segments of the target demos matched by subsequence DTW in every prior episode.

    Segmentation uses ``state[:, position_dims]`` of the target steps (MetaWorld: the hand
    position); matching uses the ``encoder``'s per-step embeddings of prior and target.
    ``k=None, scoring="rank"`` keeps every match ranked within its segment, for a step budget;
    ``padding`` extends every match by that many steps on both sides.
    """
    opts = options or StrapConfig()
    encoder, k, threshold, min_length = opts.encoder, opts.k, opts.threshold, opts.min_length
    position_dims, scoring, padding = opts.position_dims, opts.scoring, opts.padding
    sources = default_prior_sources(store, prior_sources)
    tsrc = target_source(target_task)
    prior_keys = {s: embeddings_key(encoder, s) for s in sources}
    target_key = embeddings_key(encoder, tsrc)
    inputs = {kk: store.input_fingerprint(kk) for kk in [*prior_keys.values(), target_key, steps_key(tsrc)]}
    config = {"method": "strap", "target": target_task, "prior_sources": sources, "encoder": encoder, "k": k,
              "threshold": threshold, "min_length": min_length, "position_dims": list(position_dims)}
    if scoring != "cost" or padding:  # absent from older manifests: they stay current
        config.update(scoring=scoring, padding=padding)
    tasks = executor or _tasks(None)

    def produce(writer) -> dict:
        steps = load_steps(store, [tsrc])
        if len(steps) == 0:  # checked first: every later check of the target's shape would name a dim 0
            raise ValueError(f"STRAP: the target set {store.uri_of(steps_key(tsrc))} is empty; need at least one "
                             f"target demo of {target_task!r} (e.g. `distcur ingest metaworld --target {target_task}`)")
        emb = store.read_table(target_key, columns=["episode", "step", "z"])
        target_z = list_column_to_numpy(emb.column("z"), "z")
        if len(target_z) != len(steps):
            raise ValueError(f"STRAP: {target_key} has {len(target_z)} rows but {steps_key(tsrc)} has {len(steps)}; "
                             "re-run `distcur embed`")
        # align embeddings to the step rows by (episode, step)
        order_z = np.lexsort((emb.column("step").to_numpy(), emb.column("episode").to_numpy()))
        order_s = np.lexsort((steps.step, steps.episode))
        z_aligned = np.empty_like(target_z)
        z_aligned[order_s] = target_z[order_z]
        if steps.state.shape[1] <= max(position_dims, default=0):
            raise ValueError(f"STRAP: position_dims {position_dims} exceed the target state dim {steps.state.shape[1]}")
        segments = strap_lib.target_segments(z_aligned, steps.state[:, list(position_dims)], steps.episode,
                                             steps.step, threshold, min_length, source=tsrc)
        for key in prior_keys.values():
            dim = _feature_dim(store, key, "z")
            if dim is not None and dim != target_z.shape[1]:
                raise ValueError(f"STRAP: {key} embeddings have dim {dim} but {target_key} has dim {target_z.shape[1]}")

        tasks.start()
        parts = _parts(store, prior_keys)
        part_episodes = tasks.map(_part_episodes, [(store, path) for _, path in parts])
        appearances: dict[str, dict[int, int]] = {src: {} for src in sources}
        for (src, _), eps in zip(parts, part_episodes):
            for e in eps.tolist():
                appearances[src][e] = appearances[src].get(e, 0) + 1
        split = {src: np.array(sorted(e for e, c in a.items() if c > 1), np.int64) for src, a in appearances.items()}
        seg_ref = tasks.put(segments)
        results = tasks.map(_strap_match_part, [(store, path, src, seg_ref, split[src]) for src, path in parts])
        matches: list[strap_lib.Match] = [m for ms, _ in results for m in ms]
        for src in sources:  # episodes split across parts: gather their rows here (a few per part)
            pieces = [rows for (s, _), (_, rows) in zip(parts, results) if s == src and len(rows[0])]
            if pieces:
                ep, st, z = (np.concatenate([p[i] for p in pieces]) for i in range(3))
                matches.extend(strap_lib.match_episodes(segments, src, ep, st, z))
        kept = strap_lib.top_k_matches(matches, len(segments), k)
        kept_ref, scores_ref = tasks.put(kept), tasks.put(strap_lib.match_step_scores(kept, scoring))
        _add_parts(writer, tasks.map(_strap_write_part, [
            (store, path, src, f"{writer.data_dir}/part-{i:05d}.parquet", kept_ref, scores_ref, padding)
            for i, (src, path) in enumerate(parts)]))
        return {"method": "strap", "target": target_task, "segments": len(segments),
                "segment_lengths": [len(s) for s in segments], "candidate_matches": len(matches),
                "kept_matches": len(kept), "kept": [asdict(m) for m in kept[:1000]]}

    return commit_output(store, out_key, STAGE, config, inputs, produce, quiet=True).manifest


# -- IWR -------------------------------------------------------------------------------------------
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
    """(whitened z, carry, whitened subsample rows, whitened probe rows) of one shard; ``carry``: its
    keys and target-KDE log-sums (``lse_target``), one row per step.

    ``white``: the prior's whitening; ``target_white``: the target KDE's own (None: the prior's);
    ``target_y`` [n_t, d]: the target points whitened by it.
    """
    table = read_ranges(store, ranges, list(ID_COLUMNS) + ["z"])
    z = _z(store, table, ranges)
    y = white.apply(z)
    lse_t = log_kde_partial_sums(y if target_white is None else target_white.apply(z), target_y, h_t)
    carry = table.select(list(ID_COLUMNS)).append_column("lse_target", pa.array(lse_t, pa.float64()))
    return y, carry, y[sub_local], y[probe_local]


def _write_scores(store: Store, data_dir: str, const: float, sub_n: int, prior_n: int, block: int, carry: pa.Table,
                  lse_prior: np.ndarray, lse_prior_sq: np.ndarray | None = None):
    """Write part ``block`` of the scores table; returns (rel, rows, logw summary, rel-std sample)."""
    log_w = carry.column("lse_target").to_numpy() - lse_prior + const
    if not np.isfinite(log_w).all():
        bad = int(np.argmax(~np.isfinite(log_w)))
        raise FloatingPointError(
            f"IWR produced a non-finite score {log_w[bad]} at source={carry.column('source')[bad]}, "
            f"episode={carry.column('episode')[bad]}, step={carry.column('step')[bad]}"
        )
    table = pa.Table.from_arrays(
        [carry.column("source"), carry.column("episode"), carry.column("step"), pa.array(log_w, pa.float64()),
         pa.array(["iwr"] * len(log_w), pa.string())],
        schema=SCORE_SCHEMA,
    )
    rel = f"{data_dir}/part-{block:05d}.parquet"
    store.write_parquet(rel, table)
    rel_std = None
    if lse_prior_sq is not None:
        rel_std = rel_std_sample(relative_std(lse_prior, lse_prior_sq, sub_n, prior_n))
    return rel, len(log_w), (float(log_w.min()), float(log_w.max()), float(log_w.sum())), rel_std


def run_iwr(store: Store, prior_keys: list[str], target_key: str, out_key: str, options: IwrConfig | None = None,
            address: str | None = None, executor: Any = None) -> Manifest:
    """Score every prior step by IWR and commit a scores table (SCORE_SCHEMA, method="iwr").

    prior_keys / target_key: embedding tables (EMBEDDING_SCHEMA) in ``store``. ``options``
    (:class:`distcur.methods.IwrConfig`): mode "exact" sums over every prior point (query blocks x
    reference shards, logsumexp-reduced); mode "subsample" uses a uniform random subsample of
    ``subsample`` prior points as the prior KDE's references (unbiased for the density) and reports
    its estimation error in the manifest metadata. ``kernel``: ``"shared-prior"`` or ``"per-set"``
    (:mod:`distcur.score.iwr`). ``bandwidth="likelihood"`` holds out whole target episodes (source,
    episode). ``num_shards``: reference shards = query blocks (default: one per 100k prior rows).
    ``executor``: a grid executor of :mod:`distcur.distributed.kde` (default: the one
    ``options.executor`` names, ``tasks``, on the Ray at ``address``); the same numbers either way.
    """
    from distcur.distributed.kde import grid_executor

    opts = options or IwrConfig()
    if not prior_keys:
        raise ValueError("run_iwr: prior_keys is empty")
    prior_keys = list(prior_keys)
    grid = executor or grid_executor(opts.executor, address)
    bandwidth, mode, kernel, subsample = opts.bandwidth, opts.mode, opts.kernel, opts.subsample
    config = {"method": "iwr", "prior_keys": prior_keys, "target_key": target_key, "bandwidth": bandwidth,
              "mode": mode, "num_shards": opts.num_shards, "subsample": subsample, "seed": SEED}
    # Keys absent from older manifests only where they change the numbers, so those stay current.
    if kernel != "shared-prior":
        config["kernel"] = kernel
    if bandwidth == "likelihood":
        config["heldout_folds"] = "episode"
    inputs = {k: store.input_fingerprint(k) for k in prior_keys}
    inputs[target_key] = store.input_fingerprint(target_key)

    def produce(writer) -> dict:
        t0 = time.time()
        target_tab = store.read_table(target_key, columns=["source", "episode", "step", "z"])
        if target_tab.num_rows == 0:
            raise ValueError(f"target embeddings {store.uri_of(target_key)} are empty: nothing to retrieve for")
        target_z = list_column_to_numpy(target_tab.column("z"), f"column 'z' of {target_key}")
        check_points(target_z, f"target embeddings {target_key}",
                     keys=tuple(target_tab.column(c).to_numpy(zero_copy_only=False) for c in ID_COLUMNS))
        shards, n = plan_shards(store, prior_keys, opts.num_shards)
        k = len(shards)

        grid.start()
        stats = grid.map(_shard_moments, [(store, s) for s in shards])
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

        own, target_ref = None if t_white is white else t_white, grid.put(target_y)
        loads = [(store, sh, white, own, target_ref, h_t, local(sub_idx, i), local(probe_idx, i))
                 for i, sh in enumerate(shards)]
        const = log_weight_constant(h_t, h_p, len(target_y), s if s else n, d, t_white, white)
        out = grid.grid(_load_shard, loads, log_kde_partial_sums, combine_log_partials,
                        functools.partial(_write_scores, store, writer.data_dir, const, max(s, 1), n),
                        [h_p, h_p / math.sqrt(2)] if s else [h_p], refs="subsample" if s else "own",
                        probe_bandwidth=h_p if s else None, desc="IWR log-KDE blocks")
        results = out.results
        writer.add_files([r[0] for r in results], sum(r[1] for r in results), schema=SCORE_SCHEMA)
        tasks = ({"load_and_target_sums": k, "partial_sums": out.tasks["pairs"], "combine": out.tasks["combine"]}
                 if grid.name == "tasks" else {"load_and_target_sums": k, "ray_data_query_blocks": k})
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
            "executor": grid.name,
            "tasks": tasks,
            "log_w": {"min": min(r[2][0] for r in results), "max": max(r[2][1] for r in results),
                      "mean": sum(r[2][2] for r in results) / n},
        }
        if s:
            metadata["subsample"] = subsample_error(np.concatenate([r[3] for r in results]), *out.probe, s, n, SEED)
        metadata["compute_s"] = round(time.time() - t0, 3)
        return metadata

    return commit_output(store, out_key, STAGE, config, inputs, produce, quiet=True).manifest
