"""IWR: importance-weighted retrieval by a KDE density ratio (METHODS.md §2).

``log w(z) = log p_target(z) - log p_prior(z)`` with Gaussian KDEs, always in log space.

Whitening choice: both KDEs use the *prior's* sample covariance (ddof=1) as the kernel shape,
i.e. embeddings are whitened once with the prior's mean and Cholesky factor and both KDEs are
isotropic in that space. The prior is the large, well-conditioned set, so its covariance is the
stable estimate; a shared metric also keeps the ratio a comparison of the two sets' densities
rather than of two kernel shapes (the log|det L| terms cancel).

Bandwidths (in whitened units):
- a number: the same ``h`` for both KDEs;
- ``"scott"`` / ``"silverman"``: each KDE uses its own rule for its own size (as two
  ``scipy.stats.gaussian_kde`` would), ``h = n^(-1/(d+4))`` for Scott;
- ``"likelihood"``: the target ``h_t`` maximises the 5-fold held-out log-likelihood of the target
  points over a grid; the prior's is ``h_t * (n_t / n_prior)^(1/(d+4))`` (Scott's size scaling).
"""

from __future__ import annotations

import math

import numpy as np

from distcur.score.kde import (
    Whitening,
    bandwidth_factor,
    check_points,
    heldout_bandwidth,
    log_kde_partial_sums,
    log_normaliser,
    whitening,
)
from distcur.store import Manifest, Store

BANDWIDTH_RULES = ("scott", "silverman", "likelihood")
MODES = ("exact", "subsample")


def resolve_bandwidths(
    bandwidth: str | float, target_white: np.ndarray, num_prior: int, white: Whitening
) -> tuple[float, float, dict]:
    """(h_target, h_prior, info) for whitened target points [n_t, d] and a prior of ``num_prior`` points."""
    n_t, d = target_white.shape
    info: dict = {"rule": bandwidth}
    if bandwidth == "likelihood":
        if n_t < 2:
            raise ValueError(f"bandwidth='likelihood' needs at least 2 target points, got {n_t}")
        identity = Whitening(mean=np.zeros(d), chol=np.eye(d), n=n_t)  # points are already whitened
        h_t, curve = heldout_bandwidth(target_white, white=identity, folds=5)
        info.update(curve)
        h_p = h_t * (n_t / num_prior) ** (1.0 / (d + 4))
    else:
        h_t = bandwidth_factor(bandwidth, n_t, d)
        h_p = bandwidth_factor(bandwidth, num_prior, d)
    info.update({"h_target": h_t, "h_prior": h_p})
    return h_t, h_p, info


def log_weight_constant(h_t: float, h_p: float, n_t: int, n_p: int, d: int, white: Whitening) -> float:
    """The normalisation part of ``log w``: log_normaliser(target) - log_normaliser(prior)."""
    return log_normaliser(n_t, d, h_t, white.log_det) - log_normaliser(n_p, d, h_p, white.log_det)


def iwr_log_weights(prior_z: np.ndarray, target_z: np.ndarray, bandwidth: str | float = "scott") -> np.ndarray:
    """``log p_t(z) - log p_prior(z)`` [N] at every prior point ``prior_z`` [N, d] (single process).

    target_z: [M, d]. Whitening by the prior covariance, bandwidths as in the module docstring.
    """
    prior_z = check_points(prior_z, "prior embeddings", min_rows=2)
    target_z = check_points(target_z, "target embeddings", dim=prior_z.shape[1], min_rows=1)
    white = whitening(prior_z, "prior embeddings")
    yp, yt = white.apply(prior_z), white.apply(target_z)
    h_t, h_p, _ = resolve_bandwidths(bandwidth, yt, len(yp), white)
    const = log_weight_constant(h_t, h_p, len(yt), len(yp), yp.shape[1], white)
    return log_kde_partial_sums(yp, yt, h_t) - log_kde_partial_sums(yp, yp, h_p) + const


def run_iwr(
    store: Store,
    prior_keys: list[str],
    target_key: str,
    out_key: str,
    bandwidth: str | float = "scott",
    mode: str = "exact",
    num_shards: int | None = None,
    subsample: int | None = None,
    address: str | None = None,
) -> Manifest:
    """Score every prior step by IWR on Ray and commit a scores table (SCORE_SCHEMA, method="iwr").

    prior_keys / target_key: embedding tables (EMBEDDING_SCHEMA) in ``store``. mode "exact" sums
    over every prior point (query blocks x reference shards, logsumexp-reduced); mode "subsample"
    uses a uniform random subsample of ``subsample`` prior points as the prior KDE's references
    (unbiased for the density) and reports its estimation error in the manifest metadata.
    ``num_shards``: reference shards = query blocks (default: one per 100k prior rows).
    ``address``: a Ray cluster to join (default: local Ray or RAY_ADDRESS).
    """
    if mode not in MODES:
        raise ValueError(f"unknown IWR mode {mode!r}: expected one of {MODES}")
    if mode == "subsample" and (subsample is None or subsample < 2):
        raise ValueError(f"mode='subsample' needs subsample >= 2 reference points, got {subsample}")
    if mode == "exact" and subsample is not None:
        raise ValueError("subsample is only used with mode='subsample'; got mode='exact'")
    if isinstance(bandwidth, str) and bandwidth not in BANDWIDTH_RULES:
        try:
            bandwidth = float(bandwidth)
        except ValueError:
            raise ValueError(f"unknown bandwidth {bandwidth!r}: expected a number or one of {BANDWIDTH_RULES}") from None
    if not isinstance(bandwidth, str) and not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not prior_keys:
        raise ValueError("run_iwr: prior_keys is empty")
    from distcur.distributed.kde import distributed_iwr

    return distributed_iwr(store, list(prior_keys), target_key, out_key, bandwidth=bandwidth, mode=mode,
                           num_shards=num_shards, subsample=subsample, address=address)
