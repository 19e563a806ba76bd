"""Gaussian kernel density estimation in log space, blockwise (IWR's core, docs/methods.md).

A Gaussian KDE with kernel covariance ``h^2 * Sigma`` (Sigma the sample covariance, ddof=1, the
rule of ``scipy.stats.gaussian_kde``) is an isotropic KDE on whitened points ``y = L^-1 (x - mu)``
with ``Sigma = L L^T``::

    log p(x) = logsumexp_j(-||y - y_j||^2 / (2 h^2)) - log M - d/2 log(2 pi h^2) - log|det L|

The logsumexp over references decomposes into partial sums over blocks (or shards) of the
references, combined by a logsumexp reduction: that is what makes the exact computation
distribute (see :mod:`distcur.stages.score`). Within one block the exponents come out of a
single float32 GEMM (q log2(e) / h^2 against the references); one fused, vectorised pass
(:func:`distcur.score._fastexp.exp2_row_sums`) exponentiates them, shifted by each row's maximum
over the first reference block, and sums them row-wise. The shift makes every row sum >= 1 (no
underflow, whatever the dimension); a row whose later blocks hold terms e^70 above the shift is
recomputed exactly in float64, as are rows whose float32 GEMM cancellation could exceed 1e-4.
Block partial sums are accumulated in float64. Memory is O(block_queries * block_refs): the full
N x M matrix never exists.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from distcur.schema import RowKeys, describe_row
from distcur.score._fastexp import OVERFLOW, exp2_row_sums

# One block of exponents, block_queries x block_refs float32 per worker thread (1 MiB: L2/L3-resident
# on the development machine; at d = 16, 2 threads, 512 x 512 measured 15% faster than 256 x 1024, 37% than 64 x 2048).
BLOCK_QUERIES = 512
BLOCK_REFS = 512
# Rows whose float32 exponent error bound, 2 u (|q| + max|r|)^2 / (2 h^2), exceeds this (log units)
# are recomputed in float64: it only happens for tiny bandwidths or queries far outside the data.
_MAX_LOG_ERROR = 1e-4
# Below this many query x reference pairs, threads cost more than they save.
_PARALLEL_PAIRS = 1 << 22
# Rows per float64 chunk of the whitening GEMM (8192 x d x 8 bytes of temporaries).
_WHITEN_ROWS = 8192
_BANDWIDTH_RULES = ("scott", "silverman", "likelihood")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Whitening:
    """``y = L^-1 (x - mean)`` for a sample covariance ``L L^T`` (float64 parameters)."""

    mean: np.ndarray  # [d]
    chol: np.ndarray  # [d, d] lower-triangular L
    n: int  # number of points the statistics came from

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def log_det(self) -> float:
        """log |det L| = 1/2 log det Sigma."""
        return float(np.sum(np.log(np.diag(self.chol))))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whitened float32 copy of ``x`` [n, d]: ``(x - mean) L^-T``, a float64 GEMM by row chunks.

        The triangular solve over all rows at once ran single-threaded through float64 transposes of
        the whole array and took ~0.2 s of a 200k-point KDE at d = 16; a GEMM with the (d x d) inverse,
        chunk by chunk, keeps its temporaries in cache.
        """
        x = check_points(x, "points", dim=self.dim)
        chol = torch.from_numpy(np.asarray(self.chol, dtype=np.float64))
        # torch's own solve (scipy's, next to torch's thread pool, measured 30 ms for this 16 x 16 one)
        inv_t = torch.linalg.solve_triangular(chol, torch.eye(self.dim, dtype=torch.float64), upper=False).T
        mean = torch.from_numpy(np.asarray(self.mean, dtype=np.float64))
        xt = torch.from_numpy(np.ascontiguousarray(x))
        out = torch.empty(x.shape, dtype=torch.float32)
        with torch.no_grad():
            for i in range(0, len(x), _WHITEN_ROWS):
                out[i : i + _WHITEN_ROWS] = torch.mm(xt[i : i + _WHITEN_ROWS].double() - mean, inv_t)
        return out.numpy()


def check_points(x: np.ndarray, name: str, dim: int | None = None, min_rows: int = 1,
                 keys: RowKeys | None = None) -> np.ndarray:
    """``x`` as a finite 2-D array; errors name ``name``, what was expected and (given the rows'
    ``keys``, see :func:`distcur.schema.describe_row`) the source, episode and step of a bad row."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [n, d], got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} points, got {x.shape[0]}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: embedding dim {x.shape[1]} does not match the expected dim {dim}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: points have zero dimensions")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{name}: non-finite value {x[row, col]} at {describe_row(int(row), keys)}, dimension {col}")
    return x


def whitening_from_moments(n: int, total: np.ndarray, outer: np.ndarray, name: str = "points") -> Whitening:
    """Whitening from streamed moments: ``n`` points, ``total = sum x`` [d], ``outer = sum x x^T`` [d, d].

    The covariance is the unbiased sample covariance (ddof=1), as in ``scipy.stats.gaussian_kde``.
    A constant dimension, or one that is a linear combination of earlier ones, is an error naming
    the dimension (the KDE would be degenerate, and dividing by it would give NaN scores).
    """
    if n < 2:
        raise ValueError(f"{name}: need at least 2 points for a covariance, got {n}")
    mean = total / n
    return _whitening_from_covariance(mean, (outer - n * np.outer(mean, mean)) / (n - 1), n, name)


def _whitening_from_covariance(mean: np.ndarray, cov: np.ndarray, n: int, name: str) -> Whitening:
    var = np.diag(cov)
    scale = max(float(np.max(np.abs(var))), 1e-300)
    const = np.flatnonzero(var <= 1e-12 * scale)
    if const.size:
        raise ValueError(
            f"{name}: embedding dimension {int(const[0])} is constant (variance {var[const[0]]:.3g}); "
            f"the kernel covariance is singular. Drop constant dimensions ({const.tolist()[:10]}) first."
        )
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        chol = None
    if chol is None or np.min(np.diag(chol)) <= 1e-6 * math.sqrt(scale):
        for k in range(1, cov.shape[0] + 1):
            try:
                lk = np.linalg.cholesky(cov[:k, :k])
            except np.linalg.LinAlgError:
                lk = None
            if lk is None or lk[-1, -1] <= 1e-6 * math.sqrt(scale):
                raise ValueError(
                    f"{name}: embedding dimension {k - 1} is a linear combination of dimensions 0..{k - 2}; "
                    "the kernel covariance is singular"
                )
    return Whitening(mean=mean, chol=chol, n=int(n))


def moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, sum x, sum x x^T) in float64, to merge across shards before :func:`whitening_from_moments`."""
    x64 = np.asarray(x, dtype=np.float64)
    return x64.shape[0], x64.sum(0), x64.T @ x64


def whitening(x: np.ndarray, name: str = "points") -> Whitening:
    """Whitening from the sample covariance (ddof=1) of ``x`` [n, d]."""
    x = check_points(x, name, min_rows=2)
    x64 = x.astype(np.float64)
    mean = x64.mean(0)
    centred = x64 - mean  # centre first: better conditioned than raw moments
    return _whitening_from_covariance(mean, centred.T @ centred / (len(x) - 1), len(x), name)


def log_kde_partial_sums(
    queries: np.ndarray,
    refs: np.ndarray,
    h: float,
    block_queries: int = BLOCK_QUERIES,
    block_refs: int = BLOCK_REFS,
    threads: int | None = None,
) -> np.ndarray:
    """``logsumexp_j(-||q_i - r_j||^2 / (2 h^2))`` for every query, over this block of references.

    queries: [N, d] and refs: [M, d], already whitened (isotropic kernel); h: bandwidth in the
    whitened units. Returns float64 [N] (-inf for every query when ``refs`` is empty). Combine the
    partial sums of disjoint reference blocks with :func:`combine_log_partials`. ``threads``:
    worker threads, each running single-threaded torch on its own query blocks (no barriers, one
    block per core's L2); default ``torch.get_num_threads()``, 1 for small problems.
    """
    queries = check_points(queries, "queries", min_rows=0)
    refs = check_points(refs, "refs", dim=queries.shape[1], min_rows=0)
    if not (np.isfinite(h) and h > 0):
        raise ValueError(f"bandwidth h must be a positive finite number, got {h}")
    n, m = len(queries), len(refs)
    if n == 0 or m == 0:
        return np.full(n, -np.inf)
    threads = threads or torch.get_num_threads()
    if n * m < _PARALLEL_PAIRS:
        threads = 1
    threads = max(1, min(threads, -(-n // block_queries)))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _log_kde_partial_sums(queries, refs, float(h), block_queries, block_refs, threads)
    finally:
        torch.set_num_threads(before)


def _log_kde_partial_sums(queries: np.ndarray, refs: np.ndarray, h: float, block_queries: int,
                          block_refs: int, threads: int) -> np.ndarray:
    n, m = len(queries), len(refs)
    # exp(-|q - r|^2 / 2h^2) = exp(-|q|^2 / 2h^2) * exp(q.r / h^2 - |r|^2 / 2h^2): the GEMM is the bare
    # (n x d) @ (d x M) product q/h^2 . r, the per-reference term is added inside the exp kernel and
    # the per-query term after the log. Both are centred on the references' mean first, so that the
    # cancellation between them loses little in float32 (rows where it could are redone in float64).
    # Everything per query (centring, scaling, |q|^2, the precision bound) is done block by block in
    # the worker threads, on the block the GEMM reads next: done serially over all N queries first,
    # it took 20-30% of the whole time at d = 16 once the GEMMs ran at full speed.
    inv = 1.0 / (h * h)
    log2e = 1.0 / math.log(2.0)  # exponents in base 2 for the kernel (exact range reduction)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    r = torch.from_numpy(np.ascontiguousarray(refs, dtype=np.float32))
    centre = r.mean(0, dtype=torch.float64).float()
    rc = r - centre
    r_term = ((rc * rc).sum(1) * (-0.5 * inv * log2e)).numpy()
    r_norm_max = float(rc.norm(dim=1).max())
    ref_blocks = [(rc[j : j + block_refs].T.contiguous(), r_term[j : j + block_refs]) for j in range(0, m, block_refs)]
    log_sums = np.zeros(n)  # ln sum_j 2^(exponent_ij - shift_i), >= 0
    shifts = np.zeros(n, dtype=np.float32)  # shift_i, base 2
    q_term = np.zeros(n)  # -|q_i - centre|^2 / 2h^2, float64
    imprecise = np.zeros(n, dtype=bool)

    def run(starts: list[int]) -> None:
        bq = min(block_queries, n)
        qs = torch.empty(bq, q.shape[1])
        bufs: dict[int, torch.Tensor] = {}  # one exponent buffer per reference-block width, reused
        views = [(rt, col, bufs.setdefault(rt.shape[1], torch.empty(bq, rt.shape[1]))) for rt, col in ref_blocks]
        total = np.empty(bq)
        for i in starts:
            qc = q[i : i + bq] - centre
            b = len(qc)
            qi = torch.mul(qc, inv * log2e, out=qs[:b])
            sq = (qc.double() ** 2).sum(1)
            q_term[i : i + b] = sq.numpy() * (-0.5 * inv)
            imprecise[i : i + b] = (2 * 6e-8 * (sq.sqrt() + r_norm_max) ** 2 / (2 * h * h) > _MAX_LOG_ERROR).numpy()
            tot = total[:b]
            tot[:] = 0.0
            shift = None
            for rt, col, buf in views:
                e = buf if b == bq else buf[:b]
                torch.mm(qi, rt, out=e)
                if shift is None:  # the first block's row maxima: every row sum is then >= 1
                    shift = (e + torch.from_numpy(col)).amax(1).numpy()
                exp2_row_sums(e.numpy(), col, shift, tot)
            log_sums[i : i + b] = np.log(tot)
            shifts[i : i + b] = shift

    starts = list(range(0, n, block_queries))
    if threads == 1:
        run(starts)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, [starts[t::threads] for t in range(threads)]))
    out = log_sums + shifts * math.log(2.0) + q_term
    low = np.flatnonzero(~np.isfinite(log_sums) | (log_sums > math.log(OVERFLOW)) | imprecise)
    if len(low):
        centre64 = centre.double().numpy()
        out[low] = _shifted_logsumexp(queries[low].astype(np.float64) - centre64,
                                      refs.astype(np.float64) - centre64, float(h), block_refs)
    return out


def _shifted_logsumexp(q: np.ndarray, r: np.ndarray, h: float, block_refs: int) -> np.ndarray:
    """Max-shifted logsumexp in float64, for rows the float32 path cannot give to 1e-4 (overflow, cancellation)."""
    q = torch.from_numpy(q)
    qq = (q * q).sum(1, keepdim=True)
    running = torch.full((len(q),), -math.inf, dtype=torch.float64)
    for j in range(0, len(r), block_refs):
        rj = torch.from_numpy(r[j : j + block_refs])
        d2 = (qq + (rj * rj).sum(1) - 2.0 * (q @ rj.T)).clamp_(min=0.0)
        running = torch.logaddexp(running, torch.logsumexp(d2 * (-0.5 / (h * h)), 1))
    return running.numpy()


def combine_log_partials(partials: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Logsumexp reduction of partial log-sums over disjoint reference blocks: [K, N] -> [N]."""
    stacked = np.asarray(partials, dtype=np.float64)
    if stacked.ndim != 2 or stacked.shape[0] == 0:
        raise ValueError(f"expected partial log-sums of shape [K>=1, N], got {stacked.shape}")
    top = stacked.max(0)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(stacked - safe).sum(0))


def log_normaliser(num_refs: int, dim: int, h: float, log_det: float) -> float:
    """-log M - d/2 log(2 pi h^2) - log|det L|: turns a kernel log-sum into a log-density."""
    return -math.log(num_refs) - 0.5 * dim * math.log(2 * math.pi * h * h) - log_det


def log_kde(queries: np.ndarray, refs: np.ndarray, h: float, white: Whitening | None = None) -> np.ndarray:
    """Log-density [N] of ``queries`` [N, d] under a Gaussian KDE on ``refs`` [M, d].

    Kernel covariance ``h^2 * Sigma`` with ``Sigma`` the sample covariance of ``refs`` (or of
    ``white`` when given, e.g. the prior's in IWR): equals
    ``scipy.stats.gaussian_kde(refs.T, bw_method=h).logpdf(queries.T)``.
    """
    refs = check_points(refs, "refs", min_rows=1)
    queries = check_points(queries, "queries", dim=refs.shape[1], min_rows=0)
    white = white if white is not None else whitening(refs, "refs")
    lse = log_kde_partial_sums(white.apply(queries), white.apply(refs), h)
    return lse + log_normaliser(len(refs), refs.shape[1], h, white.log_det)


def scott_factor(n: int, d: int) -> float:
    """Scott's rule, ``n^(-1/(d+4))`` (as scipy)."""
    return float(n ** (-1.0 / (d + 4)))


def silverman_factor(n: int, d: int) -> float:
    """Silverman's rule, ``(n (d+2) / 4)^(-1/(d+4))`` (as scipy)."""
    return float((n * (d + 2) / 4.0) ** (-1.0 / (d + 4)))


def fold_assignment(n: int, folds: int, groups: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Fold index [n] in 0..folds-1 of each of ``n`` points, whole groups to a fold.

    groups: the group (e.g. episode id) of each point [n], any labels ``np.unique`` orders; points of
    one group always share a fold, groups go to folds in a seeded random order, round robin. None:
    every point its own group (step-level folds).
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.permutation(n) % folds
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups: expected one group id per point, shape ({n},), got {groups.shape}")
    _, group_of = np.unique(groups, return_inverse=True)
    num_groups = int(group_of.max()) + 1
    return (rng.permutation(num_groups) % folds)[group_of]


def heldout_bandwidth(
    points: np.ndarray,
    white: Whitening | None = None,
    grid: Sequence[float] | None = None,
    folds: int = 5,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, dict]:
    """The bandwidth of the grid with the largest k-fold held-out mean log-likelihood of ``points`` [n, d].

    groups: the episode (or other group) id of each point [n]; whole groups are held out together
    (:func:`fold_assignment`), so that neighbouring, autocorrelated steps of one episode never sit on
    both sides of a fold. None: folds split by point. Returns (h, info) with info ``grid``,
    ``heldout_loglik`` (one per grid value), ``folds`` (``"group"`` or ``"point"``), ``num_folds``
    and ``at_grid_edge`` (the choice is the grid's first or last value: the optimum may lie outside
    it; logged as a warning). The default grid spans 0.25x..2x Scott's factor for ``points``
    (log-spaced, 12 values).
    """
    points = check_points(points, "points", min_rows=2)
    n, d = points.shape
    units = n if groups is None else len(np.unique(np.asarray(groups)))
    if units < 2:
        raise ValueError(f"held-out bandwidth: need at least 2 groups (episodes) to hold out, got {units}")
    folds = max(2, min(int(folds), units))
    white = white if white is not None else whitening(points, "points")
    y = white.apply(points)
    if grid is None:
        grid = (scott_factor(n, d) * np.geomspace(0.25, 2.0, 12)).tolist()
    fold_of = fold_assignment(n, folds, groups, seed)
    scores = []
    for h in grid:
        total = 0.0
        for f in range(folds):
            held, train = y[fold_of == f], y[fold_of != f]
            lse = log_kde_partial_sums(held, train, float(h))
            total += float(np.sum(lse + log_normaliser(len(train), d, float(h), white.log_det)))
        scores.append(total / n)
    best = int(np.argmax(scores))
    at_edge = len(grid) > 1 and best in (0, len(grid) - 1)
    if at_edge:
        log.warning("held-out-likelihood bandwidth h=%.4g is at the %s edge of the grid [%.4g, %.4g]: the "
                     "optimum may lie outside it (widen the grid)", grid[best], "lower" if best == 0 else "upper",
                     grid[0], grid[-1])
    return float(grid[best]), {"grid": [float(g) for g in grid], "heldout_loglik": scores,
                               "folds": "point" if groups is None else "group", "num_folds": folds,
                               "at_grid_edge": at_edge}


def bandwidth_factor(rule: str | float, n: int, d: int) -> float:
    """A numeric bandwidth, or Scott's / Silverman's rule for ``n`` points in ``d`` dims."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if not (math.isfinite(rule) and rule > 0):
            raise ValueError(f"bandwidth must be a positive finite number, got {rule}")
        return float(rule)
    if rule == "scott":
        return scott_factor(n, d)
    if rule == "silverman":
        return silverman_factor(n, d)
    raise ValueError(f"unknown bandwidth rule {rule!r}: expected a number or one of {_BANDWIDTH_RULES}")
