"""Scores -> selection: which prior steps to train on, with what weight.

A score table (:data:`distcur.schema.SCORE_SCHEMA`, one row per prior step) is grouped into
clusters at ``level``:

* ``step``     each step alone;
* ``subtraj``  windows of ``horizon`` steps within an episode, ``(source, episode, step // H)``;
* ``episode``  whole episodes, ``(source, episode)``.

A cluster's score is the mean of its steps' scores. Clusters are ranked by score, ties broken by
a permutation drawn from ``tie_seed`` (never by key order: a datamodel's LASSO zeros many clusters,
and key order would fill the budget in the order the prior was generated). Three rules:

* ``budget_percent`` (the default, 10): a share of the prior's *steps*. Clusters are taken in rank
  order until ``round(N * b / 100)`` steps are selected; the last cluster is cut to its first steps,
  so every method and granularity trains on the same amount of prior data;
* ``top_percent``: the top x% of *clusters* (``ceil(C * x / 100)``, at least one), whatever their size;
* ``threshold``: every cluster with score >= the threshold.

Every kept step enters the selection (:data:`distcur.schema.SELECTION_SCHEMA`) with weight 1
(``weighting="uniform"``) or the cluster score (``"score"``, scores must be >= 0).

The LeRobot-style export is a table of ``index, weight``: ``index`` is the global frame index
of the step when the prior's step tables are laid end to end, sources in the order recorded in
the export's manifest, episodes in increasing id, steps in order (LeRobot's ``index`` column).

Memory: the key and score columns of the score table (about 20 bytes per step) and, for the
export, one count per episode; the step tables themselves are only streamed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distcur.composition import composition, selection_composition
from distcur.data import scores_key, selection_key, steps_key
from distcur.schema import SELECTION_SCHEMA
from distcur.store import Manifest, Store

SELECT_LEVELS = ("step", "subtraj", "episode")
WEIGHTINGS = ("uniform", "score")
DEFAULT_HORIZON = 30
LEROBOT_SUFFIX = "lerobot"
LEROBOT_SCHEMA = pa.schema([pa.field("index", pa.int64(), nullable=False),
                            pa.field("weight", pa.float32(), nullable=False)])


DEFAULT_BUDGET_PERCENT = 10.0


@dataclass
class SelectConfig:
    """At most one of ``budget_percent`` (share of prior steps, 0 < b <= 100), ``top_percent``
    (share of clusters) and ``threshold``; none given means a budget of 10% of the steps."""

    budget_percent: float | None = None
    top_percent: float | None = None
    threshold: float | None = None
    level: str = "step"
    horizon: int = DEFAULT_HORIZON
    weighting: str = "uniform"
    tie_seed: int = 0

    def __post_init__(self) -> None:
        given = [n for n in ("budget_percent", "top_percent", "threshold") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"SelectConfig: give at most one of budget_percent, top_percent and threshold, got {given}")
        if not given:
            self.budget_percent = DEFAULT_BUDGET_PERCENT
        for name in ("budget_percent", "top_percent"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 100:
                raise ValueError(f"SelectConfig.{name} must be in (0, 100], got {value}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"SelectConfig.threshold must be finite, got {self.threshold}")
        if self.level not in SELECT_LEVELS:
            raise ValueError(f"SelectConfig.level must be one of {SELECT_LEVELS}, got {self.level!r}")
        if self.level == "subtraj" and self.horizon < 1:
            raise ValueError(f"SelectConfig.horizon must be >= 1, got {self.horizon}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"SelectConfig.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")


def cluster_scores(source_code: np.ndarray, episode: np.ndarray, step: np.ndarray, score: np.ndarray,
                   level: str, horizon: int = DEFAULT_HORIZON) -> tuple[np.ndarray, np.ndarray]:
    """Mean score per cluster.

    Args:
        source_code: (N,) int codes of the source (equal code = same source); episode, step,
        score: (N,). Returns (cluster (N,) int64 id per step, ordered by cluster key;
        cluster_score (C,) float64).
    """
    if level not in SELECT_LEVELS:
        raise ValueError(f"selection level must be one of {SELECT_LEVELS}, got {level!r}")
    n = len(score)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    if level == "step":
        window = np.asarray(step, np.int64)
    elif level == "subtraj":
        window = np.asarray(step, np.int64) // horizon
    else:
        window = np.zeros(n, np.int64)
    order = np.lexsort((window, episode, source_code))
    keys = np.stack([np.asarray(source_code, np.int64)[order], np.asarray(episode, np.int64)[order], window[order]])
    new = np.ones(n, bool)
    new[1:] = (keys[:, 1:] != keys[:, :-1]).any(0)
    starts = np.flatnonzero(new)
    sums = np.add.reduceat(np.asarray(score, np.float64)[order], starts)
    counts = np.diff(np.append(starts, n))
    cluster = np.empty(n, np.int64)
    cluster[order] = np.cumsum(new) - 1
    return cluster, sums / counts


def rank_clusters(cluster_score: np.ndarray, tie_seed: int = 0) -> np.ndarray:
    """Cluster ids, best score first; equal scores in the order of a permutation drawn from ``tie_seed``."""
    tie = np.random.default_rng(tie_seed).permutation(len(cluster_score))
    return np.lexsort((tie, -np.asarray(cluster_score, np.float64)))


def select_clusters(cluster_score: np.ndarray, config: SelectConfig,
                    cluster_size: np.ndarray | None = None) -> np.ndarray:
    """(C,) int64 steps kept per cluster (0: dropped; below its size: the last, cut, cluster).

    ``cluster_size`` (C,) steps per cluster, needed by the budget rule (default: 1 each).
    """
    c = len(cluster_score)
    if not np.isfinite(cluster_score).all():
        raise ValueError(f"select: {int((~np.isfinite(cluster_score)).sum())} clusters have non-finite scores")
    size = np.ones(c, np.int64) if cluster_size is None else np.asarray(cluster_size, np.int64)
    if config.threshold is not None:
        return np.where(cluster_score >= config.threshold, size, 0)
    keep = np.zeros(c, np.int64)
    if not c:
        return keep
    order = rank_clusters(cluster_score, config.tie_seed)
    if config.top_percent is not None:
        n_keep = max(1, math.ceil(c * config.top_percent / 100.0 - 1e-9))
        keep[order[:n_keep]] = size[order[:n_keep]]
        return keep
    budget = max(1, int(round(size.sum() * config.budget_percent / 100.0)))
    before = np.cumsum(size[order]) - size[order]  # steps selected before each ranked cluster
    keep[order] = np.clip(budget - before, 0, size[order])
    return keep


def select_steps(scores: pa.Table, config: SelectConfig) -> pa.Table:
    """A selection table (SELECTION_SCHEMA, sorted by source, episode, step) from a score table."""
    missing = [c for c in ("source", "episode", "step", "score") if c not in scores.column_names]
    if missing:
        raise ValueError(f"select: score table lacks columns {missing}")
    source = pc.dictionary_encode(scores.column("source").combine_chunks())
    names = np.asarray(source.dictionary.to_pylist(), dtype=object)
    # codes ordered like the source names, so clusters sort by name
    rank = np.argsort(np.argsort(names.astype(str)))
    code = rank[source.indices.to_numpy(zero_copy_only=False)]
    episode = scores.column("episode").to_numpy().astype(np.int64)
    step = scores.column("step").to_numpy().astype(np.int32)
    score = scores.column("score").to_numpy().astype(np.float64)
    if not np.isfinite(score).all():
        row = int(np.argmin(np.isfinite(score)))
        raise ValueError(f"select: non-finite score at source={names[source.indices[row].as_py()]!r}, "
                         f"episode={episode[row]}, step={step[row]}")
    cluster, cscore = cluster_scores(code, episode, step, score, config.level, config.horizon)
    size = np.bincount(cluster, minlength=len(cscore))
    n_kept = select_clusters(cscore, config, size)
    # a cut cluster keeps its first steps: rank each step within its cluster by step order
    order = np.lexsort((step, cluster))
    first = np.zeros(len(cscore) + 1, np.int64)
    np.cumsum(size, out=first[1:])
    rank_in_cluster = np.empty(len(step), np.int64)
    rank_in_cluster[order] = np.arange(len(step)) - first[cluster[order]]
    rows = np.flatnonzero(rank_in_cluster < n_kept[cluster])
    kept = n_kept > 0
    if config.weighting == "score":
        if (cscore[kept] < 0).any():
            raise ValueError("select: weighting='score' needs non-negative scores; use weighting='uniform'")
        weight = cscore[cluster[rows]]
    else:
        weight = np.ones(len(rows))
    order = np.lexsort((step[rows], episode[rows], code[rows]))
    rows, weight = rows[order], weight[order]
    return pa.Table.from_arrays(
        [pa.array(names[source.indices.to_numpy(zero_copy_only=False)[rows]].astype(str), pa.string())
         if len(rows) else pa.array([], pa.string()),
         pa.array(episode[rows], pa.int64()), pa.array(step[rows], pa.int32()), pa.array(weight, pa.float32())],
        schema=SELECTION_SCHEMA,
    )


def run_select(store: Store, scores_run: str, out_run: str, config: SelectConfig | None = None,
               export_lerobot: bool = False) -> Manifest:
    """Select from ``scores/<scores_run>``; commit ``selections/<out_run>`` (and its LeRobot export)."""
    config = config or SelectConfig()
    in_key, out_key = scores_key(scores_run), selection_key(out_run)
    inputs = {in_key: store.input_fingerprint(in_key)}
    stage_config = dict(config.__dict__)
    if store.is_done(out_key, "select", stage_config, inputs):
        manifest = store.manifest(out_key)
    else:
        scores = store.read_table(in_key, columns=["source", "episode", "step", "score"])
        table = select_steps(scores, config)
        n_steps = scores.num_rows
        score_manifest = store.manifest(in_key)
        target = score_target(score_manifest)
        manifest = store.write_table(out_key, table, "select", stage_config, inputs, metadata={
            "scores": scores_run, "method": score_manifest.metadata.get("method"), "target": target,
            "sources": sorted(set(scores.column("source").unique().to_pylist())),
            **selection_metadata(store, table, n_steps, target),
        })
    if export_lerobot:
        export_lerobot_weights(store, out_run)
    return manifest


def score_target(manifest: Manifest) -> str | None:
    """The target task a score run was made for (IWR names only its target embedding table)."""
    target = manifest.metadata.get("target") or manifest.config.get("target")
    key = str(manifest.config.get("target_key", ""))
    if not target and "source=target-" in key:
        target = key.split("source=target-", 1)[1].split("/", 1)[0]
    return target


def selection_metadata(store: Store, table: pa.Table, prior_steps: int, target: str | None) -> dict:
    """Size and make-up of a selection, for its manifest (every selection, baselines too)."""
    if not table.num_rows:
        comp: dict | None = composition_of_nothing()
    elif all(store.manifest(steps_key(s)) is not None for s in set(table.column("source").to_pylist())):
        comp = selection_composition(store, table, target)
    else:  # a score table brought without its step tables: nothing to describe the selection by
        comp = None
    return {"selected_steps": table.num_rows, "scored_steps": prior_steps,
            "selected_fraction": table.num_rows / prior_steps if prior_steps else 0.0, "composition": comp}


def composition_of_nothing() -> dict:
    return composition(np.zeros(0, str), np.zeros(0, bool), np.zeros(0, str), None)


def lerobot_key(run: str) -> str:
    return f"{selection_key(run)}/{LEROBOT_SUFFIX}"


def episode_offsets(store: Store, sources: list[str]) -> tuple[dict[str, tuple[int, np.ndarray, np.ndarray]], int]:
    """Per source: (first global index, sorted episode ids, global index of each episode's step 0); total frames."""
    out, offset = {}, 0
    for src in sources:
        counts: dict[int, int] = {}
        for rb in store.iter_batches(steps_key(src), columns=["episode"]):
            eps, n = np.unique(rb.column(0).to_numpy(), return_counts=True)
            for e, c in zip(eps.tolist(), n.tolist()):
                counts[e] = counts.get(e, 0) + c
        eps = np.array(sorted(counts), np.int64)
        lengths = np.array([counts[e] for e in eps.tolist()], np.int64)
        starts = offset + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(eps) else np.zeros(0, np.int64)
        out[src] = (offset, eps, starts.astype(np.int64))
        offset += int(lengths.sum())
    return out, offset


def export_lerobot_weights(store: Store, run: str, sources: list[str] | None = None) -> Manifest:
    """Write ``selections/<run>/lerobot``: ``index, weight`` over the prior laid end to end.

    ``sources`` default to every source that was scored (recorded by :func:`run_select`).
    """
    sel_key = selection_key(run)
    selection = store.read_table(sel_key)
    sel_sources = sorted(set(selection.column("source").to_pylist()))
    if sources is None:
        sources = store.manifest(sel_key).metadata.get("sources") or sel_sources
    sources = sorted(sources)
    unknown = sorted(set(sel_sources) - set(sources))
    if unknown:
        raise ValueError(f"export: selection {sel_key} has steps of sources {unknown} not in {sources}")
    inputs = {sel_key: store.input_fingerprint(sel_key), **{steps_key(s): store.input_fingerprint(steps_key(s))
                                                            for s in sources}}
    out_key = lerobot_key(run)
    config = {"format": "lerobot", "sources": sources}
    if store.is_done(out_key, "export", config, inputs):
        return store.manifest(out_key)
    offsets, total = episode_offsets(store, sources)
    src = np.asarray(selection.column("source").to_pylist(), dtype=object)
    episode = selection.column("episode").to_numpy().astype(np.int64)
    step = selection.column("step").to_numpy().astype(np.int64)
    index = np.empty(len(episode), np.int64)
    for s in sel_sources:
        rows = src == s
        _, eps, starts = offsets[s]
        pos = np.searchsorted(eps, episode[rows])
        bad = (pos >= len(eps)) | (eps[np.minimum(pos, len(eps) - 1)] != episode[rows])
        if bad.any():
            raise ValueError(f"export: selection {sel_key} names source={s!r}, episode={episode[rows][bad][0]} "
                             f"which is not in {steps_key(s)}")
        index[rows] = starts[pos] + step[rows]
    table = pa.Table.from_arrays([pa.array(index, pa.int64()), selection.column("weight").combine_chunks()],
                                 schema=LEROBOT_SCHEMA).sort_by("index")
    return store.write_table(out_key, table, "export", config, inputs, metadata={
        "index": "global frame index over the step tables of `sources` laid end to end, episodes in "
                 "increasing id, steps in order",
        "source_offsets": {s: int(offsets[s][0]) for s in sources},
        "total_frames": total,
    })
