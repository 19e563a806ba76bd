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

This module is the maths, on arrays and tables; the stage that reads the scores and commits the
selection (and its LeRobot / HDF5 exports) is :mod:`distcur.stages.select`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distcur.clusters import DEFAULT_HORIZON, episode_clusters
from distcur.schema import SELECTION_SCHEMA

SELECT_LEVELS = ("step", "subtraj", "episode")
WEIGHTINGS = ("uniform", "score")
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
    cluster, _ = episode_clusters(source_code, episode, step, level, horizon)
    if not len(cluster):
        return cluster, np.zeros(0)
    order = np.argsort(cluster, kind="stable")  # each cluster's rows in table order
    counts = np.bincount(cluster)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return cluster, np.add.reduceat(np.asarray(score, np.float64)[order], starts) / counts


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
