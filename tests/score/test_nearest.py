"""SR/AR/BR nearest-neighbour scores: blockwise equals brute force; bad inputs fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from distcur.score.nearest import min_distances, minmax_scale, nearest_scores
from distcur.score.random import random_scores


def brute_force_min_distances(prior, target):
    return np.sqrt(((prior[:, None, :].astype(np.float64) - target[None].astype(np.float64)) ** 2).sum(-1)).min(1)


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_blockwise_equals_brute_force(block):
    rng = np.random.default_rng(0)
    prior = rng.normal(size=(301, 5)).astype(np.float32)
    target = rng.normal(size=(53, 5)).astype(np.float32)
    np.testing.assert_allclose(min_distances(prior, target, block), brute_force_min_distances(prior, target),
                               rtol=1e-9, atol=1e-6)
    raw = -brute_force_min_distances(prior, target)
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    scores = nearest_scores(prior, target, block)
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert scores.min() == 0.0 and scores.max() == 1.0


def test_target_rows_score_one_and_exact_duplicates_have_zero_distance():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(10, 3)) * 10
    prior = np.concatenate([target[:4], rng.normal(size=(20, 3)) * 10 + 50])
    d = min_distances(prior, target, block=3)
    assert np.all(d[:4] < 1e-6)
    np.testing.assert_allclose(nearest_scores(prior, target, block=3)[:4], 1.0, atol=1e-9)


def test_mismatched_dims_empty_target_and_nan_fail_clearly():
    prior = np.zeros((4, 3))
    with pytest.raises(ValueError, match="prior has dim 3 but target has dim 2"):
        nearest_scores(prior, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="target set is empty"):
        nearest_scores(prior, np.zeros((0, 3)))
    bad = prior.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite value in prior at row 2"):
        nearest_scores(bad, np.zeros((1, 3)))


def test_constant_dimension_and_identical_points_give_finite_scores():
    rng = np.random.default_rng(2)
    prior = rng.normal(size=(50, 4))
    prior[:, 2] = 7.0  # a constant embedding dimension
    target = rng.normal(size=(5, 4))
    target[:, 2] = 7.0
    s = nearest_scores(prior, target)
    assert np.isfinite(s).all() and s.min() == 0.0 and s.max() == 1.0
    same = nearest_scores(np.ones((6, 2)), np.ones((3, 2)))  # every prior step equally close
    assert np.array_equal(same, np.ones(6))
    assert nearest_scores(np.zeros((0, 2)), np.ones((3, 2))).shape == (0,)


def test_minmax_scale_with_given_bounds():
    np.testing.assert_allclose(minmax_scale(np.array([-3.0, -1.0]), lo=-5.0, hi=-1.0), [0.5, 1.0])


def test_random_scores_are_uniform_and_independent_of_sharding():
    ep = np.repeat(np.arange(200), 50)
    st = np.tile(np.arange(50), 200)
    s = random_scores("metaworld", ep, st, seed=3)
    assert s.min() >= 0.0 and s.max() < 1.0 and abs(s.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(random_scores("metaworld", ep[500:900], st[500:900], seed=3), s[500:900])
    assert not np.array_equal(random_scores("metaworld", ep, st, seed=4), s)
    assert not np.array_equal(random_scores("other", ep, st, seed=3), s)
