"""Step -> cluster id: the groups of steps that a datamodel scores together.

A cluster is derived from the step table's keys, never stored by hand (docs/store.md). Levels,
finest to coarsest:

* ``step``     one step, ``(source, episode, step)``;
* ``subtraj``  consecutive windows of ``horizon`` steps within an episode, ``(source, episode, step // H)``;
* ``episode``  one episode, ``(source, episode)``;
* ``task``     every step with the same task string (over sources);
* ``source``   a whole source dataset.

Ids are dense (0 .. C-1) in order of first appearance, so a cluster's id is stable for a
given step table and level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distcur.data import StepArrays

CLUSTER_LEVELS = ("step", "subtraj", "episode", "task", "source")
DEFAULT_HORIZON = 30


@dataclass
class Clusters:
    """``ids`` (N,) int64 in 0..C-1 per step; ``keys`` (C,) str naming each cluster."""

    level: str
    horizon: int
    ids: np.ndarray
    keys: np.ndarray

    @property
    def n_clusters(self) -> int:
        return len(self.keys)

    def sizes(self) -> np.ndarray:
        """Steps per cluster, (C,) int64."""
        return np.bincount(self.ids, minlength=self.n_clusters).astype(np.int64)


def _dense(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids in order of first appearance, and the key of each id."""
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse].astype(np.int64), uniq[order]


def window_of(step: np.ndarray, level: str, horizon: int = DEFAULT_HORIZON) -> np.ndarray:
    """(N,) int64 index of each step's cluster within its episode: the step itself (``step``), its
    ``horizon``-step window (``subtraj``) or 0 (``episode``)."""
    if level == "step":
        return np.asarray(step, np.int64)
    if level == "subtraj":
        return np.asarray(step, np.int64) // horizon
    return np.zeros(len(step), np.int64)


def episode_clusters(source_code: np.ndarray, episode: np.ndarray, step: np.ndarray, level: str,
                     horizon: int = DEFAULT_HORIZON) -> tuple[np.ndarray, np.ndarray]:
    """The step / subtraj / episode clusters of N steps, ordered by (source code, episode, window).

    Returns (ids (N,) int64 in 0..C-1, first (C,) int64: for each cluster, the row of its first
    step in that order). One lexsort; no per-step strings. Used by the datamodels
    (:func:`cluster_ids`) and by selection (:func:`distcur.select.cluster_scores`)."""
    n = len(step)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    window = window_of(step, level, horizon)
    order = np.lexsort((window, episode, source_code))
    keys = np.stack([np.asarray(source_code, np.int64)[order], np.asarray(episode, np.int64)[order], window[order]])
    new = np.ones(n, bool)
    new[1:] = (keys[:, 1:] != keys[:, :-1]).any(0)
    ids = np.empty(n, np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids, order[new]


def source_codes(source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N,) int64 ordered like the sorted names, names (S,) str)."""
    names, codes = np.unique(np.asarray(source).astype(str), return_inverse=True)
    return codes.astype(np.int64), names


def cluster_ids(steps: StepArrays, level: str = "episode", horizon: int = DEFAULT_HORIZON) -> Clusters:
    """Cluster every step of ``steps`` at ``level`` (see the module docstring)."""
    if level not in CLUSTER_LEVELS:
        raise ValueError(f"cluster level must be one of {CLUSTER_LEVELS}, got {level!r}")
    if level == "subtraj" and horizon <= 0:
        raise ValueError(f"subtraj clusters need a positive horizon, got {horizon}")
    if len(steps) == 0:
        raise ValueError("cannot cluster an empty step table")
    if level in ("source", "task"):
        ids, names = _dense((steps.source if level == "source" else steps.task).astype(str))
        return Clusters(level=level, horizon=0, ids=ids, keys=names)
    code, src_names = source_codes(steps.source)
    by_key, first = episode_clusters(code, steps.episode, steps.step, level, horizon)
    # renumber in order of first appearance in the table
    first_row = np.full(len(first), len(by_key), np.int64)
    np.minimum.at(first_row, by_key, np.arange(len(by_key)))
    order = np.argsort(first_row, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    rep = first[order]  # a representative row of each cluster, in the new order
    episode = steps.episode.astype(np.int64)[rep]
    keys = [f"{s}/{e}" for s, e in zip(src_names[code[rep]], episode.tolist())]
    if level == "step":
        keys = [f"{k}/{t}" for k, t in zip(keys, steps.step.astype(np.int64)[rep].tolist())]
    elif level == "subtraj":
        keys = [f"{k}/h{w}" for k, w in zip(keys, (steps.step.astype(np.int64)[rep] // horizon).tolist())]
    return Clusters(level=level, horizon=int(horizon) if level == "subtraj" else 0, ids=rank[by_key],
                    keys=np.asarray(keys, dtype=str))
