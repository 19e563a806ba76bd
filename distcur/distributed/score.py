"""The score stage on Ray: the plain scorers of ``distcur.score`` mapped over the prior's parquet parts.

Every method writes ``scores/<run>`` (:data:`distcur.schema.SCORE_SCHEMA`, one row per prior
step, higher = more useful for the target) with a manifest, and is skipped when a committed
output has the same config and input fingerprints. Each Ray task reads one part (a file named
by the input table's manifest), streams it in batches and writes its own immutable output part;
the driver only ever holds small things (the target set, per-part bounds, STRAP's matches).

- ``sr`` / ``ar`` / ``br``: two rounds. Round 1 computes ``-min distance to the target set`` per
  part and reports its min and max; round 2 min-max scales with the global bounds and writes.
  Features: raw state (``sr``), raw action (``ar``) from the step tables; the encoder's
  embedding (``br``, default ``vae``) from ``embeddings/<encoder>/``.
- ``strap``: per part, count rows per episode; match the target segments against the episodes
  that lie wholly in one part there, and return the rows of episodes split across parts to the
  driver, which matches them; keep the top k; a last round writes step scores.
- ``random``: one round, hash-based uniform scores.
- ``iwr``: delegated to :func:`distcur.score.iwr.run_iwr` (embedding keys in, scores out).

Use :func:`score` for all of them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

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
from distcur.methods import RandomConfig, names, scorer_options
from distcur.schema import SCORE_SCHEMA, list_column_to_numpy
from distcur.score import strap as strap_lib
from distcur.score.nearest import NEAREST_FEATURES, check_features, min_distances, minmax_scale
from distcur.score.random import random_scores
from distcur.store import Manifest, Store

log = logging.getLogger(__name__)

SCORE_METHODS = names("scorer")
STAGE = "score"
READ_BATCH = 65_536


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


def _commit(store: Store, writer, results: list[tuple[str, int]], metadata: dict) -> Manifest:
    rels = [r for r, _ in results]
    rows = sum(n for _, n in results)
    writer.add_files(rels, rows, SCORE_SCHEMA)
    if not rels:
        writer.write(SCORE_SCHEMA.empty_table())
    return writer.commit(metadata)


def _remote(fn, **options):
    import ray

    return ray.remote(**{"num_cpus": 1, **options})(fn)


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


def run_nearest(store: Store, method: str, target_task: str, out_key: str, prior_sources: list[str] | None = None,
                encoder: str = "vae", block: int = 1024, address: str | None = None) -> Manifest:
    """SR / AR / BR scores of every prior step against the target demos of ``target_task``."""
    import ray

    from distcur.distributed.session import ensure_ray

    if method not in NEAREST_FEATURES:
        raise ValueError(f"run_nearest: method must be one of {sorted(NEAREST_FEATURES)}, got {method!r}")
    table_kind, column = NEAREST_FEATURES[method]
    sources = default_prior_sources(store, prior_sources)
    tsrc = target_source(target_task)

    def key_of(src: str) -> str:
        return steps_key(src) if table_kind == "steps" else embeddings_key(encoder, src)

    prior_keys = {s: key_of(s) for s in sources}
    inputs = {k: store.input_fingerprint(k) for k in [*prior_keys.values(), key_of(tsrc)]}
    config = {"method": method, "target": target_task, "prior_sources": sources, "block": block,
              **({"encoder": encoder} if table_kind == "embeddings" else {})}
    if store.is_done(out_key, STAGE, config, inputs):
        log.info("%s is up to date", out_key)
        return store.manifest(out_key)
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

    ensure_ray(address)
    writer = store.writer(out_key, STAGE, config, inputs)
    try:
        target_ref = ray.put(np.ascontiguousarray(target))
        raw_fn = _remote(_nearest_raw_part, num_returns=2)
        parts = _parts(store, prior_keys)
        bounds_refs, table_refs = [], []
        for _, path in parts:
            b, t = raw_fn.remote(store, path, column, target_ref, block)
            bounds_refs.append(b)
            table_refs.append(t)
        bounds = ray.get(bounds_refs)
        lo = min((b[0] for b in bounds), default=0.0)
        hi = max((b[1] for b in bounds), default=0.0)
        write_fn = _remote(_scale_and_write)
        results = ray.get([write_fn.remote(store, f"{writer.data_dir}/part-{i:05d}.parquet", t, lo, hi, method)
                           for i, t in enumerate(table_refs)])
        return _commit(store, writer, results, {"method": method, "target": target_task, "raw_min": lo,
                                                "raw_max": hi, "target_rows": int(len(target))})
    except BaseException:
        writer.abort()
        raise


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
    if not tables:
        return rel, 0
    table = pa.concat_tables(tables)
    store.write_parquet(rel, table)
    return rel, table.num_rows


def run_random(store: Store, target_task: str, out_key: str, prior_sources: list[str] | None = None,
               seed: int = 0, level: str = "step", horizon: int = 30, address: str | None = None) -> Manifest:
    """Uniform random scores for every prior step (the target only names the run).

    ``level``: one draw per step, per sub-trajectory of ``horizon`` steps, or per episode (every
    step of the cluster gets it), so a selection at that level is a uniform draw of its clusters
    (per-step draws averaged over an episode would favour short episodes at both ends)."""
    import ray

    from distcur.distributed.session import ensure_ray

    RandomConfig(seed=seed, level=level, horizon=horizon)  # the options' checks
    sources = default_prior_sources(store, prior_sources)
    target_key = steps_key(target_source(target_task))
    if store.manifest(target_key) is None:  # the scores ignore it, but the run is named for it
        raise FileNotFoundError(f"random: --target {target_task!r} has no target demos at {store.uri_of(target_key)}")
    prior_keys = {s: steps_key(s) for s in sources}
    inputs = {k: store.input_fingerprint(k) for k in prior_keys.values()}
    config = {"method": "random", "target": target_task, "prior_sources": sources, "seed": seed}
    if level != "step":
        config.update(level=level, horizon=horizon)
    if store.is_done(out_key, STAGE, config, inputs):
        return store.manifest(out_key)
    ensure_ray(address)
    writer = store.writer(out_key, STAGE, config, inputs)
    try:
        fn = _remote(_random_part)
        results = ray.get([fn.remote(store, path, f"{writer.data_dir}/part-{i:05d}.parquet", seed, level, horizon)
                           for i, (_, path) in enumerate(_parts(store, prior_keys))])
        return _commit(store, writer, results, {"method": "random", "target": target_task})
    except BaseException:
        writer.abort()
        raise


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
    if not tables:
        return rel, 0
    table = pa.concat_tables(tables)
    store.write_parquet(rel, table)
    return rel, table.num_rows


def run_strap(store: Store, target_task: str, out_key: str, prior_sources: list[str] | None = None,
              encoder: str = "vae", k: int | None = strap_lib.DEFAULT_TOP_K,
              threshold: float = strap_lib.DEFAULT_THRESHOLD, min_length: int = strap_lib.DEFAULT_MIN_LENGTH,
              position_dims: tuple[int, ...] = (0, 1, 2), scoring: str = "cost", padding: int = 0,
              address: str | None = None) -> Manifest:
    """STRAP scores: segments of the target demos matched by subsequence DTW in every prior episode.

    Segmentation uses ``state[:, position_dims]`` of the target steps (MetaWorld: the hand
    position); matching uses the ``encoder``'s per-step embeddings of prior and target.
    ``k=None, scoring="rank"`` keeps every match ranked within its segment, for a step budget;
    ``padding`` extends every match by that many steps on both sides.
    """
    import ray

    from distcur.distributed.session import ensure_ray

    sources = default_prior_sources(store, prior_sources)
    tsrc = target_source(target_task)
    prior_keys = {s: embeddings_key(encoder, s) for s in sources}
    target_key = embeddings_key(encoder, tsrc)
    inputs = {kk: store.input_fingerprint(kk) for kk in [*prior_keys.values(), target_key, steps_key(tsrc)]}
    config = {"method": "strap", "target": target_task, "prior_sources": sources, "encoder": encoder, "k": k,
              "threshold": threshold, "min_length": min_length, "position_dims": list(position_dims)}
    if scoring != "cost" or padding:  # absent from older manifests: they stay current
        config.update(scoring=scoring, padding=padding)
    if padding < 0:
        raise ValueError(f"STRAP: padding must be >= 0 steps, got {padding}")
    if store.is_done(out_key, STAGE, config, inputs):
        return store.manifest(out_key)
    if k is not None and k < 1:
        raise ValueError(f"STRAP: k must be >= 1 (or None: every match), got {k}")
    if scoring not in strap_lib.SCORINGS:
        raise ValueError(f"STRAP: scoring must be one of {strap_lib.SCORINGS}, got {scoring!r}")

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
    segments = strap_lib.target_segments(z_aligned, steps.state[:, list(position_dims)], steps.episode, steps.step,
                                         threshold, min_length, source=tsrc)
    for key in prior_keys.values():
        dim = _feature_dim(store, key, "z")
        if dim is not None and dim != target_z.shape[1]:
            raise ValueError(f"STRAP: {key} embeddings have dim {dim} but {target_key} has dim {target_z.shape[1]}")

    ensure_ray(address)
    writer = store.writer(out_key, STAGE, config, inputs)
    try:
        parts = _parts(store, prior_keys)
        part_episodes = ray.get([_remote(_part_episodes).remote(store, path) for _, path in parts])
        appearances: dict[str, dict[int, int]] = {src: {} for src in sources}
        for (src, _), eps in zip(parts, part_episodes):
            for e in eps.tolist():
                appearances[src][e] = appearances[src].get(e, 0) + 1
        split = {src: np.array(sorted(e for e, c in a.items() if c > 1), np.int64) for src, a in appearances.items()}
        seg_ref = ray.put(segments)
        fn = _remote(_strap_match_part)
        results = ray.get([fn.remote(store, path, src, seg_ref, split[src]) for src, path in parts])
        matches: list[strap_lib.Match] = [m for ms, _ in results for m in ms]
        for src in sources:  # episodes split across parts: gather their rows here (a few per part)
            pieces = [rows for (s, _), (_, rows) in zip(parts, results) if s == src and len(rows[0])]
            if pieces:
                ep, st, z = (np.concatenate([p[i] for p in pieces]) for i in range(3))
                matches.extend(strap_lib.match_episodes(segments, src, ep, st, z))
        kept = strap_lib.top_k_matches(matches, len(segments), k)
        kept_ref, scores_ref = ray.put(kept), ray.put(strap_lib.match_step_scores(kept, scoring))
        write_fn = _remote(_strap_write_part)
        written = ray.get([write_fn.remote(store, path, src, f"{writer.data_dir}/part-{i:05d}.parquet", kept_ref,
                                           scores_ref, padding) for i, (src, path) in enumerate(parts)])
        return _commit(store, writer, written, {
            "method": "strap", "target": target_task, "segments": len(segments),
            "segment_lengths": [len(s) for s in segments], "candidate_matches": len(matches),
            "kept_matches": len(kept), "kept": [asdict(m) for m in kept[:1000]]})
    except BaseException:
        writer.abort()
        raise


# -- one entry point --------------------------------------------------------------------------------
def score(store: Store, method: str, target_task: str, out_run: str, prior_sources: list[str] | None = None,
          address: str | None = None, **opts) -> Manifest:
    """Score every prior step for ``target_task`` with ``method``; commit ``scores/<out_run>``.

    ``opts``: the fields of the method's config in :mod:`distcur.methods` (``StateNearestConfig``,
    ``BrConfig``, ``StrapConfig``, ``RandomConfig``, ``IwrConfig``), checked there: an option the
    method does not take is an error (IWR's ``executor``: "tasks" or "ray-data", the same
    scores either way). ``prior_sources`` (default: every non-target source), ``address`` (Ray).
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown score method {method!r}; expected one of {SCORE_METHODS}")
    options = scorer_options(method, **opts)
    out_key = scores_key(out_run)
    common = {"prior_sources": prior_sources, "address": address}
    if method in NEAREST_FEATURES:
        return run_nearest(store, method, target_task, out_key, **common, **options)
    if method == "strap":
        return run_strap(store, target_task, out_key, **common, **options)
    if method == "random":
        return run_random(store, target_task, out_key, **common, **options)
    from distcur.score.iwr import run_iwr

    encoder = options.pop("encoder")
    sources = default_prior_sources(store, prior_sources)
    return run_iwr(store, [embeddings_key(encoder, s) for s in sources],
                   embeddings_key(encoder, target_source(target_task)), out_key, address=address, **options)
