"""IWR maths: the density ratio against scipy, its limits, bandwidth rules and bad input."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from distcur.score.iwr import iwr_log_weights
from distcur.score.kde import whitening

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from embedding_factory import prior_and_target_arrays, two_scipy_kdes  # noqa: E402


@pytest.fixture(scope="module")
def prior_and_target():
    return prior_and_target_arrays()


def test_per_set_kernel_equals_two_scipy_gaussian_kdes(prior_and_target):
    prior, target = np.concatenate(prior_and_target[:2]), prior_and_target[2]
    expected = two_scipy_kdes(prior, target)
    # Measured: max |error| 3e-5 on log-ratios spanning -366..4 (float32 kernel sums).
    np.testing.assert_allclose(iwr_log_weights(prior, target, "scott", kernel="per-set"), expected,
                               rtol=1e-6, atol=1e-4)
    # The shared prior whitening is a different estimator here (the target is 0.4x the prior's scale).
    assert np.abs(iwr_log_weights(prior, target, "scott") - expected).max() > 10


def test_nearest_neighbour_limit_of_target_density():
    rng = np.random.default_rng(1)
    prior, target = rng.normal(size=(400, 3)), rng.normal(size=(30, 3))
    white = whitening(prior)
    yp, yt = white.apply(prior), white.apply(target)
    nn = ((yp[:, None].astype(np.float64) - yt[None]) ** 2).sum(-1).min(1)
    # log w = log p_t - log p_prior: rank by the target part alone with h -> 0.
    from distcur.score.kde import log_kde_partial_sums

    log_pt = log_kde_partial_sums(yp, yt, 1e-3)
    assert np.array_equal(np.argsort(-log_pt, kind="stable"), np.argsort(nn, kind="stable"))
    # A moderate bandwidth does not reproduce it exactly (the test can fail).
    assert not np.array_equal(np.argsort(-log_kde_partial_sums(yp, yt, 1.0)), np.argsort(nn))


def test_prior_from_the_target_distribution_gives_near_flat_weights():
    rng = np.random.default_rng(2)
    same = iwr_log_weights(rng.normal(size=(3000, 3)), rng.normal(size=(3000, 3)), 0.5)
    shifted = iwr_log_weights(rng.normal(size=(3000, 3)), rng.normal(size=(3000, 3)) * 0.5 + 1.0, 0.5)
    # Measured: IQR of log w 0.13 for the same distribution vs 5.0 for a shifted, narrower target.
    iqr_same = np.subtract(*np.quantile(same, [0.75, 0.25]))
    iqr_shift = np.subtract(*np.quantile(shifted, [0.75, 0.25]))
    assert abs(np.median(same)) < 0.1 and iqr_same < 0.35
    assert iqr_shift > 5 * iqr_same


@pytest.mark.parametrize("rule", ["silverman", "likelihood"])
def test_bandwidth_rules_give_finite_weights(rule):
    rng = np.random.default_rng(3)
    w = iwr_log_weights(rng.normal(size=(500, 3)), rng.normal(size=(80, 3)) + 0.5, rule)
    assert w.shape == (500,) and np.all(np.isfinite(w))


def test_bad_input_is_a_clear_error():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="target embeddings: embedding dim 3 does not match the expected dim 4"):
        iwr_log_weights(rng.normal(size=(100, 4)), rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="target embeddings: expected at least 1 points, got 0"):
        iwr_log_weights(rng.normal(size=(100, 4)), np.zeros((0, 4)))
    constant = rng.normal(size=(100, 4))
    constant[:, 1] = 0.25
    with pytest.raises(ValueError, match="dimension 1 is constant"):
        iwr_log_weights(constant, rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match=r"target embeddings \(4 points in 4 dims\): .* singular .*shared-prior"):
        iwr_log_weights(rng.normal(size=(100, 4)), rng.normal(size=(4, 4)), kernel="per-set")
    with pytest.raises(ValueError, match=r"target embeddings \(10 points in 4 dims\): embedding dimension 1 is "
                                         r"constant.*kernel='per-set' needs the target's own covariance"):
        iwr_log_weights(rng.normal(size=(100, 4)), constant[:10], kernel="per-set")
    with pytest.raises(ValueError, match="unknown IWR kernel 'own'"):
        iwr_log_weights(rng.normal(size=(100, 4)), rng.normal(size=(10, 4)), kernel="own")
