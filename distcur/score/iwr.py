"""IWR: importance-weighted retrieval by a KDE density ratio (docs/methods.md).

``log w(z) = log p_target(z) - log p_prior(z)`` with Gaussian KDEs, always in log space.

Kernel shapes (``kernel``):
- ``"shared-prior"`` (default): both KDEs use the *prior's* sample covariance (ddof=1) as the
  kernel shape, i.e. embeddings are whitened once with the prior's mean and Cholesky factor and
  both KDEs are isotropic in that space; the log|det L| terms cancel. It needs only the prior's
  covariance, estimated from the large set, so it works for a target of any size.
- ``"per-set"`` (the reference's): each KDE is a Gaussian KDE of its own set, with its own sample
  covariance (ddof=1), exactly what two independent ``scipy.stats.gaussian_kde`` give. The target
  KDE then needs the target's covariance to be non-singular: fewer target points than dims + 1 (or
  a dimension constant or collinear within the target) is an error naming the set, its size and
  dim, never a silent ridge.
Which one becomes the default is decided by the benchmark protocol; both are kept so it can be
measured. On generated multi-task embeddings (``benchmarks/iwr_kernels.py``: 50k prior steps, 1000
target steps, 14 dims) both put the related task's steps first, agree on little else (Spearman
0.30-0.39, top-10% overlap 0.51-0.57) and per-set takes about twice as long: in the target's own,
narrower whitening most prior points lie far from the target, and the KDE recomputes their sums
in float64 (its precision guard).

Bandwidths (in each KDE's whitened units):
- a number: the same ``h`` for both KDEs;
- ``"scott"`` / ``"silverman"``: each KDE uses its own rule for its own size (as two
  ``scipy.stats.gaussian_kde`` would), ``h = n^(-1/(d+4))`` for Scott;
- ``"likelihood"``: the target ``h_t`` maximises the 5-fold held-out log-likelihood of the target
  points (whitened as the target KDE's kernel) over a grid, whole episodes held out together when
  the target's episode ids are given; the prior's is ``h_t * (n_t / n_prior)^(1/(d+4))`` (Scott's
  size scaling). A choice on the grid's edge is logged as a warning and flagged in the info.
"""

from __future__ import annotations

import math

import numpy as np

from distcur.methods import IWR_KERNELS as KERNELS
from distcur.score.kde import (
    Whitening,
    bandwidth_factor,
    check_points,
    heldout_bandwidth,
    log_kde_partial_sums,
    log_normaliser,
    whitening,
)

HELDOUT_FOLDS = 5


def target_whitening(kernel: str, target_z: np.ndarray, prior_white: Whitening, name: str) -> Whitening:
    """The target KDE's whitening: the prior's (``"shared-prior"``) or the target's own (``"per-set"``).

    target_z: [n_t, d]; ``name`` names the target set in errors.
    """
    if kernel == "shared-prior":
        return prior_white
    if kernel != "per-set":
        raise ValueError(f"unknown IWR kernel {kernel!r}: expected one of {KERNELS}")
    n_t, d = target_z.shape
    what = f"{name} ({n_t} points in {d} dims)"
    hint = "kernel='per-set' needs the target's own covariance; use kernel='shared-prior' or more target points"
    if n_t <= d:
        raise ValueError(f"{what}: the sample covariance of {n_t} points in {d} dims is singular "
                         f"(need at least {d + 1}); {hint}")
    try:
        return whitening(target_z, what)
    except ValueError as e:
        raise ValueError(f"{e}; {hint}") from None


def resolve_bandwidths(
    bandwidth: str | float, target_white: np.ndarray, num_prior: int, groups: np.ndarray | None = None
) -> tuple[float, float, dict]:
    """(h_target, h_prior, info) for a prior of ``num_prior`` points and the target points [n_t, d].

    target_white: the target points whitened as the target KDE's kernel; groups: the episode id of
    each target point [n_t], for episode-level held-out folds (``"likelihood"`` only; None: folds by
    point). info: the rule, both bandwidths and, for ``"likelihood"``, the held-out curve and
    ``at_grid_edge``.
    """
    n_t, d = target_white.shape
    info: dict = {"rule": bandwidth}
    if bandwidth == "likelihood":
        if n_t < 2:
            raise ValueError(f"bandwidth='likelihood' needs at least 2 target points, got {n_t}")
        identity = Whitening(mean=np.zeros(d), chol=np.eye(d), n=n_t)  # points are already whitened
        h_t, curve = heldout_bandwidth(target_white, white=identity, folds=HELDOUT_FOLDS, groups=groups)
        info.update(curve)
        h_p = h_t * (n_t / num_prior) ** (1.0 / (d + 4))
    else:
        h_t = bandwidth_factor(bandwidth, n_t, d)
        h_p = bandwidth_factor(bandwidth, num_prior, d)
    info.update({"h_target": h_t, "h_prior": h_p})
    return h_t, h_p, info


def log_weight_constant(h_t: float, h_p: float, n_t: int, n_p: int, d: int, target_white: Whitening,
                        prior_white: Whitening) -> float:
    """The normalisation part of ``log w``: log_normaliser(target) - log_normaliser(prior)."""
    return (log_normaliser(n_t, d, h_t, target_white.log_det)
            - log_normaliser(n_p, d, h_p, prior_white.log_det))


def iwr_log_weights(prior_z: np.ndarray, target_z: np.ndarray, bandwidth: str | float = "scott",
                    kernel: str = "shared-prior", target_groups: np.ndarray | None = None) -> np.ndarray:
    """``log p_t(z) - log p_prior(z)`` [N] at every prior point ``prior_z`` [N, d] (single process).

    target_z: [M, d]; kernel and bandwidths as in the module docstring; target_groups: the episode
    id of each target point [M] (held-out folds of ``bandwidth="likelihood"``; None: by point).
    """
    prior_z = check_points(prior_z, "prior embeddings", min_rows=2)
    target_z = check_points(target_z, "target embeddings", dim=prior_z.shape[1], min_rows=1)
    white = whitening(prior_z, "prior embeddings")
    t_white = target_whitening(kernel, target_z, white, "target embeddings")
    yt = t_white.apply(target_z)
    h_t, h_p, _ = resolve_bandwidths(bandwidth, yt, len(prior_z), target_groups)
    const = log_weight_constant(h_t, h_p, len(yt), len(prior_z), prior_z.shape[1], t_white, white)
    yp = white.apply(prior_z)
    yp_t = yp if t_white is white else t_white.apply(prior_z)
    return log_kde_partial_sums(yp_t, yt, h_t) - log_kde_partial_sums(yp, yp, h_p) + const


def relative_std(lse: np.ndarray, lse_sq: np.ndarray, s: int, n: int) -> np.ndarray:
    """Relative std of the subsample density estimate mean_j K_j from s of n references.

    ``lse`` = log sum_j K_j and ``lse_sq`` = log sum_j K_j^2 over the subsample; the finite-population
    variance of a mean of s draws without replacement is (1 - s/n) sigma^2 / s.
    """
    second_over_first_sq = np.exp(lse_sq - 2 * lse + math.log(s))  # E[K^2] / E[K]^2
    sigma2_rel = np.maximum(second_over_first_sq - 1.0, 0.0) * s / max(s - 1, 1)
    return np.sqrt((1.0 - s / n) * sigma2_rel / s)


def rel_std_sample(rel_std: np.ndarray) -> np.ndarray:
    """At most 1000 of a part's relative stds (drawn by a seed of their count) and their maximum."""
    rng = np.random.default_rng(len(rel_std))
    return np.concatenate([rng.choice(rel_std, min(1000, len(rel_std)), replace=False), [rel_std.max()]])


def subsample_error(rel_std: np.ndarray, probe_exact_lse: np.ndarray, probe_sub_lse: np.ndarray, s: int, n: int,
                    seed: int) -> dict:
    """The error of a subsample prior density: estimated (``rel_std``, the parts' samples of
    :func:`relative_std`) and measured on probe points (their kernel log-sums over all ``n`` prior
    points and over the ``s`` subsample references)."""
    exact = probe_exact_lse - math.log(n)
    approx = probe_sub_lse - math.log(s)
    rel_err = np.abs(np.expm1(approx - exact))
    return {
        "size": s,
        "fraction": s / n,
        "seed": seed,
        "estimated_relative_std": {"median": float(np.median(rel_std)), "p90": float(np.quantile(rel_std, 0.9)),
                                   "max": float(rel_std.max())},
        "probe_points": len(exact),
        "measured_relative_error": {"median": float(np.median(rel_err)), "p90": float(np.quantile(rel_err, 0.9)),
                                    "max": float(rel_err.max())},
        "measured_log_error_rms": float(np.sqrt(np.mean((approx - exact) ** 2))),
    }
