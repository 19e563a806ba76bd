"""Nearest-neighbour similarity scores: SR (state), AR (action), BR (state-action VAE embedding).

The score of a prior step i is ``-min_j ||x_i - y_j||`` over the target steps j, min-max
scaled to [0, 1] over the prior (1 = closest to the target set). Distances are computed in
blocks of ``block`` prior rows x ``block`` target rows through the GEMM identity
``||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y`` in float64, so memory is O(block^2), never N x M.
"""

from __future__ import annotations

import numpy as np

from distcur.schema import RowKeys, describe_row

# method -> (which table the features come from, column)
NEAREST_FEATURES = {"sr": ("steps", "state"), "ar": ("steps", "action"), "br": ("embeddings", "z")}


def check_features(prior: np.ndarray, target: np.ndarray, what: str = "features", prior_keys: RowKeys | None = None,
                   target_keys: RowKeys | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (N, d) prior and a (M, d) target: 2-D, same d, M >= 1, all finite.

    ``prior_keys`` / ``target_keys``: the rows' (source, episode, step), named by a non-finite error."""
    prior = np.asarray(prior)
    target = np.asarray(target)
    if prior.ndim != 2 or target.ndim != 2:
        raise ValueError(f"{what}: expected 2-D arrays (rows, dim), got prior {prior.shape} and target {target.shape}")
    if len(target) == 0:
        raise ValueError(f"{what}: the target set is empty; need at least one target step")
    if prior.shape[1] != target.shape[1]:
        raise ValueError(f"{what}: prior has dim {prior.shape[1]} but target has dim {target.shape[1]}; "
                         "they must come from the same encoder / column")
    if target.shape[1] == 0:
        raise ValueError(f"{what}: zero-dimensional features")
    for name, arr, keys in (("prior", prior, prior_keys), ("target", target, target_keys)):
        finite = np.isfinite(arr).all(1)
        if not finite.all():
            raise ValueError(f"{what}: non-finite value in {name} at {describe_row(int(np.argmin(finite)), keys)}")
    return prior, target


def min_distances(prior: np.ndarray, target: np.ndarray, block: int = 1024,
                  prior_keys: RowKeys | None = None) -> np.ndarray:
    """(N,) float64 Euclidean distance from each prior row to its nearest target row (``prior_keys``:
    see :func:`check_features`)."""
    prior, target = check_features(prior, target, prior_keys=prior_keys)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    out = np.empty(len(prior), np.float64)
    t_blocks = []
    for t0 in range(0, len(target), block):
        t = target[t0:t0 + block].astype(np.float64)
        t_blocks.append((t, (t * t).sum(1)))
    for p0 in range(0, len(prior), block):
        p = prior[p0:p0 + block].astype(np.float64)
        p_sq = (p * p).sum(1)
        best = np.full(len(p), np.inf)
        for t, t_sq in t_blocks:
            d2 = p_sq[:, None] + t_sq[None, :] - 2.0 * (p @ t.T)
            np.minimum(best, d2.min(1), out=best)
        out[p0:p0 + block] = np.sqrt(np.maximum(best, 0.0))
    return out


def minmax_scale(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Scale to [0, 1] by (x - lo) / (hi - lo); all ones when hi == lo (no step is preferred)."""
    x = np.asarray(x, np.float64)
    lo = float(x.min()) if lo is None else float(lo)
    hi = float(x.max()) if hi is None else float(hi)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"minmax_scale: non-finite bounds lo={lo}, hi={hi}")
    if hi <= lo:
        return np.ones_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def nearest_scores(prior: np.ndarray, target: np.ndarray, block: int = 1024, scale: bool = True) -> np.ndarray:
    """(N,) score of each prior row: ``-min_j ||prior_i - target_j||``, min-max scaled to [0, 1] if ``scale``."""
    raw = -min_distances(prior, target, block)
    if len(raw) == 0 or not scale:
        return raw
    return minmax_scale(raw)
