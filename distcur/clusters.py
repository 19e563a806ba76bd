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


def cluster_ids(steps: StepArrays, level: str = "episode", horizon: int = DEFAULT_HORIZON) -> Clusters:
    """Cluster every step of ``steps`` at ``level`` (see the module docstring)."""
    if level not in CLUSTER_LEVELS:
        raise ValueError(f"cluster level must be one of {CLUSTER_LEVELS}, got {level!r}")
    if level == "subtraj" and horizon <= 0:
        raise ValueError(f"subtraj clusters need a positive horizon, got {horizon}")
    if len(steps) == 0:
        raise ValueError("cannot cluster an empty step table")
    src = steps.source.astype(str)
    sep = np.array("/", dtype=str)
    if level == "source":
        keys = src
    elif level == "task":
        keys = steps.task.astype(str)
    else:
        keys = np.char.add(np.char.add(src, sep), steps.episode.astype(str))
        if level == "step":
            keys = np.char.add(np.char.add(keys, sep), steps.step.astype(str))
        elif level == "subtraj":
            window = (steps.step.astype(np.int64) // horizon).astype(str)
            keys = np.char.add(np.char.add(keys, np.array("/h", dtype=str)), window)
    ids, names = _dense(keys)
    return Clusters(level=level, horizon=int(horizon) if level == "subtraj" else 0, ids=ids, keys=names)
