"""Groups of state-action pairs for rebalancing (docs/methods.md, Balanced BC).

A group is a sub-behaviour whose share of the data should not decide its share of the policy:
a task, a source, or a cluster found without labels. Groups come from labels when the data has
them, otherwise from k-means on embeddings (or standardised state-action pairs) with k chosen by
the silhouette score on a subsample. Every rebalancing method turns a simplex vector ``alpha``
over groups into per-sample weights with :func:`alpha_to_sample_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GroupAssignment:
    """``group[i]`` in ``0..G-1`` is the group of sample i; ``names[g]`` names group g.

    ``method`` is ``"labels"`` or ``"kmeans"``; for k-means ``silhouette`` maps each tried k to
    its score and ``k`` is the chosen one.
    """

    group: np.ndarray  # (N,) int64
    names: list[str]
    method: str
    silhouette: dict[int, float] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.names)

    def counts(self) -> np.ndarray:
        return np.bincount(self.group, minlength=self.k).astype(np.int64)


def check_groups(group: np.ndarray, num_groups: int, names: Sequence[str] | None = None) -> np.ndarray:
    """Validate a group vector and return its per-group counts (G,).

    Rebalancing needs at least two groups, each with at least one sample; anything else is a
    ValueError that names the offending group.
    """
    group = np.asarray(group)
    if group.ndim != 1 or len(group) == 0:
        raise ValueError(f"group must be a non-empty 1-D array of group ids, got shape {group.shape}")
    if not np.issubdtype(group.dtype, np.integer):
        raise ValueError(f"group ids must be integers, got dtype {group.dtype}")
    if num_groups < 2:
        raise ValueError(f"rebalancing needs at least 2 groups, got {num_groups} ({list(names or [])})")
    if group.min() < 0 or group.max() >= num_groups:
        raise ValueError(f"group ids must lie in [0, {num_groups}), got range [{group.min()}, {group.max()}]")
    counts = np.bincount(group, minlength=num_groups)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        label = names[empty[0]] if names is not None else int(empty[0])
        raise ValueError(f"group {label!r} has no samples; every group must hold at least one sample")
    return counts.astype(np.int64)


def groups_from_labels(labels: Sequence[str] | np.ndarray) -> GroupAssignment:
    """One group per distinct label (task or source), ordered by label."""
    labels = np.asarray(labels).astype(str)
    names, group = np.unique(labels, return_inverse=True)
    out = GroupAssignment(group=group.astype(np.int64), names=[str(n) for n in names], method="labels")
    check_groups(out.group, out.k, out.names)
    return out


def _kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[rng.integers(len(x))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=d2 / total)
        centers.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return np.stack(centers)


def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :], 0.0)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100, restarts: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding, best of ``restarts``: (labels (N,), centers (k, d))."""
    x = np.asarray(x, np.float64)
    if k < 1 or k > len(x):
        raise ValueError(f"kmeans: k={k} must lie in [1, {len(x)}] (the number of points)")
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(restarts):
        centers = _kmeans_pp_init(x, k, rng)
        labels = np.zeros(len(x), np.int64)
        for it in range(iters):
            new = _sq_dists(x, centers).argmin(1)
            if it > 0 and np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                # An emptied cluster restarts at the point farthest from its centre.
                centers[j] = members.mean(0) if len(members) else x[_sq_dists(x, centers).min(1).argmax()]
        inertia = float(_sq_dists(x, centers)[np.arange(len(x)), labels].sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centers.copy())
    assert best is not None
    return best[1], best[2]


def silhouette_score(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (b - a) / max(a, b) with Euclidean distances; O(n^2) memory, so subsample."""
    x = np.asarray(x, np.float64)
    ks = np.unique(labels)
    if len(ks) < 2:
        return -1.0
    d = np.sqrt(_sq_dists(x, x))
    onehot = (labels[:, None] == ks[None, :]).astype(np.float64)
    sizes = onehot.sum(0)
    sums = d @ onehot  # (n, k): summed distance from each point to each cluster
    own = np.searchsorted(ks, labels)
    own_size = sizes[own]
    a = np.where(own_size > 1, sums[np.arange(len(x)), own] / np.maximum(own_size - 1, 1), 0.0)
    mean_other = sums / sizes[None, :]
    mean_other[np.arange(len(x)), own] = np.inf
    b = mean_other.min(1)
    s = np.where(own_size > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def kmeans_groups(
    features: np.ndarray,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    seed: int = 0,
    silhouette_samples: int = 2000,
    standardize: bool = True,
) -> GroupAssignment:
    """Discover groups by k-means on ``features`` (N, d): embeddings or state-action pairs.

    With ``k=None`` every k in ``k_range`` (inclusive) is tried and the one with the highest
    silhouette score on a random subsample of ``silhouette_samples`` points wins; all scores are
    kept in the result so the choice is reported.
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"kmeans_groups: expected features of shape (N >= 2, d), got {x.shape}")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"kmeans_groups: non-finite feature at row {bad[0]}, column {bad[1]}")
    if standardize:
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
    rng = np.random.default_rng(seed)
    sub = rng.choice(len(x), size=min(silhouette_samples, len(x)), replace=False)
    if k is not None:
        candidates = [int(k)]
    else:
        lo, hi = k_range
        if lo < 2 or hi < lo:
            raise ValueError(f"kmeans_groups: k_range must satisfy 2 <= lo <= hi, got {k_range}")
        candidates = list(range(lo, min(hi, len(sub) - 1) + 1))
        if not candidates:
            raise ValueError(f"kmeans_groups: too few points ({len(x)}) to try k in {k_range}")
    scores: dict[int, float] = {}
    fits: dict[int, np.ndarray] = {}
    for kk in candidates:
        _, centers = kmeans(x[sub], kk, seed=seed)
        labels = _sq_dists(x, centers).argmin(1)
        fits[kk] = labels
        scores[kk] = round(silhouette_score(x[sub], labels[sub]), 6) if kk > 1 else 0.0
    chosen = max(scores, key=lambda kk: (scores[kk], -kk))
    labels = fits[chosen]
    # Drop clusters that received no points from the full data, keeping ids dense.
    used, dense = np.unique(labels, return_inverse=True)
    out = GroupAssignment(
        group=dense.astype(np.int64),
        names=[f"cluster-{i}" for i in range(len(used))],
        method="kmeans",
        silhouette=scores,
    )
    check_groups(out.group, out.k, out.names)
    return out


def alpha_to_sample_weights(group: np.ndarray, alpha: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Per-sample weights (N,) that give group g a total share ``alpha[g]`` of the loss.

    w_i = alpha_g * N / n_g, so the weights average 1 over the data and sampling or weighting
    by them draws group g with probability alpha_g (q(s, a) = p(s, a) alpha_g / rho_g).
    """
    alpha = np.asarray(alpha, np.float64)
    counts = check_groups(group, len(alpha)) if counts is None else np.asarray(counts)
    check_alpha(alpha)
    return (alpha[group] * len(group) / counts[group]).astype(np.float32)


def check_alpha(alpha: np.ndarray, atol: float = 1e-6) -> np.ndarray:
    """Group weights must be finite, strictly positive and sum to 1."""
    alpha = np.asarray(alpha, np.float64)
    if alpha.ndim != 1 or len(alpha) < 2:
        raise ValueError(f"group weights must be a vector over >= 2 groups, got shape {alpha.shape}")
    if not np.isfinite(alpha).all():
        raise ValueError(f"group weights contain non-finite values: {alpha.tolist()}")
    if (alpha <= 0).any():
        raise ValueError(f"group weights must be strictly positive, got {alpha.tolist()}")
    if abs(alpha.sum() - 1) > atol:
        raise ValueError(f"group weights must sum to 1, got sum {alpha.sum():.8f}")
    return alpha
