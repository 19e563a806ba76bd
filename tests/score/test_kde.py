"""Log-KDE maths: equality with scipy, partial-sum combination, bandwidths, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

from distcur.score.kde import (
    combine_log_partials,
    fold_assignment,
    heldout_bandwidth,
    log_kde,
    log_kde_partial_sums,
    scott_factor,
    silverman_factor,
    whitening,
)


def correlated(rng, n, d, shift=0.0):
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift


@pytest.mark.parametrize("d,bw", [(1, None), (3, 0.3), (3, "silverman"), (16, 0.5), (8, 0.05)])
def test_log_kde_equals_scipy_gaussian_kde(d, bw):
    rng = np.random.default_rng(d)
    refs = correlated(rng, 700, d, shift=3.0)
    queries = np.concatenate([refs[:40], correlated(rng, 120, d, shift=3.0) * 2.0, refs[:5] + 50.0])
    kde = st.gaussian_kde(refs.T, bw_method=bw)
    expected = kde.logpdf(queries.T)
    got = log_kde(queries, refs, kde.factor)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_bandwidth_rules_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    assert scott_factor(300, 5) == pytest.approx(st.gaussian_kde(x.T).scotts_factor())
    assert silverman_factor(300, 5) == pytest.approx(st.gaussian_kde(x.T).silverman_factor())


def test_partial_sums_over_reference_blocks_combine_to_the_whole():
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(300, 6)).astype(np.float32), rng.normal(size=(1000, 6)).astype(np.float32)
    whole = log_kde_partial_sums(q, r, 0.4)
    parts = [log_kde_partial_sums(q, r[a:b], 0.4) for a, b in [(0, 1), (1, 333), (333, 1000)]]
    np.testing.assert_allclose(combine_log_partials(parts), whole, rtol=1e-6, atol=2e-5)
    # Blocking inside one call does not change the answer either.
    np.testing.assert_allclose(log_kde_partial_sums(q, r, 0.4, block_queries=7, block_refs=33), whole, rtol=1e-6, atol=2e-5)
    # Reference in float64 (direct logsumexp).
    d2 = ((q[:, None, :].astype(np.float64) - r[None].astype(np.float64)) ** 2).sum(-1)
    from scipy.special import logsumexp

    np.testing.assert_allclose(whole, logsumexp(-d2 / (2 * 0.4**2), axis=1), rtol=1e-6, atol=2e-5)
    assert np.all(log_kde_partial_sums(q, r[:0], 0.4) == -np.inf)
    np.testing.assert_allclose(combine_log_partials([whole, np.full(300, -np.inf)]), whole)


def test_tiny_bandwidth_does_not_underflow():
    rng = np.random.default_rng(2)
    q, r = rng.normal(size=(50, 4)), rng.normal(size=(80, 4))
    lse = log_kde_partial_sums(q, r, 1e-4)
    nn = ((q[:, None] - r[None]) ** 2).sum(-1).min(1)
    assert np.all(np.isfinite(lse))
    np.testing.assert_allclose(lse, -nn / (2e-8), rtol=1e-6)


def test_fused_exp_kernel_matches_float64_exp_over_its_range():
    from distcur.score._fastexp import MAX_REL_ERROR, exp2_row_sums

    rng = np.random.default_rng(5)
    # Multiples of 1/64: e + col - shift is exact in float32 whatever the order of the additions.
    grid = lambda lo, hi, size: (rng.integers(lo * 64, hi * 64, size=size) / 64).astype(np.float32)  # noqa: E731
    e = grid(-140, 90, (37, 301))  # odd sizes: vector tails
    col, shift = grid(-5, 5, 301), grid(-3, 3, 37)
    sums = np.full(37, 2.0)  # accumulates into what is there
    exp2_row_sums(e, col, shift, sums)
    x = e.astype(np.float64) + col - shift[:, None]
    expected = 2.0 + np.exp2(np.clip(x, -126.0, 126.0)).sum(1)
    np.testing.assert_allclose(sums, expected, rtol=MAX_REL_ERROR)


def test_rows_whose_later_reference_blocks_dwarf_the_first_are_recomputed_exactly():
    # The float32 path shifts each row by its maximum over the first reference block; here the
    # nearest reference sits in a later block, 2^400 above anything in the first: the row sum
    # would overflow, so the row must come back from the float64 fallback, equal to logsumexp.
    from scipy.special import logsumexp

    rng = np.random.default_rng(6)
    r = rng.normal(size=(100, 3)) * 0.01 + 5.0
    q = np.concatenate([rng.normal(size=(4, 3)) * 0.01 - 5.0, rng.normal(size=(3, 3)) * 0.01 + 5.0])
    r = np.concatenate([r, q[:4] + 1e-3])  # the far queries' neighbours: in the last block only
    got = log_kde_partial_sums(q, r, 0.5, block_refs=16)
    d2 = ((q[:, None, :] - r[None]) ** 2).sum(-1)
    np.testing.assert_allclose(got, logsumexp(-d2 / (2 * 0.25), axis=1), rtol=1e-6, atol=1e-5)


def test_heldout_bandwidth_picks_a_sensible_interior_value():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 3))
    h, curve = heldout_bandwidth(x, folds=4)
    assert curve["grid"][0] < h < curve["grid"][-1]
    assert max(curve["heldout_loglik"]) == pytest.approx(curve["heldout_loglik"][curve["grid"].index(h)])


def test_folds_hold_out_whole_episodes():
    rng = np.random.default_rng(7)
    lengths = rng.integers(5, 60, size=23)
    episodes = np.repeat(np.array([f"src/{i}" for i in range(23)]), lengths)
    fold_of = fold_assignment(len(episodes), 5, groups=episodes)
    for ep in np.unique(episodes):
        assert len(np.unique(fold_of[episodes == ep])) == 1, ep
    assert set(fold_of.tolist()) == set(range(5))
    # Step-level folds (no groups) do split episodes: that is the leak the groups remove.
    by_step = fold_assignment(len(episodes), 5)
    assert all(len(np.unique(by_step[episodes == ep])) > 1 for ep in np.unique(episodes)[lengths > 20])
    with pytest.raises(ValueError, match=r"groups: expected one group id per point, shape \(10,\)"):
        fold_assignment(10, 2, groups=np.zeros(9))


def test_episode_folds_remove_the_leak_of_autocorrelated_steps():
    # 30 slow random walks of 40 steps: each step's neighbours in its own episode sit 0.1 away.
    rng = np.random.default_rng(7)
    walks = rng.normal(size=(30, 1, 2)) + np.cumsum(rng.normal(size=(30, 40, 2)) * 0.05, axis=1)
    x, episodes = walks.reshape(-1, 2), np.repeat(np.arange(30), 40)
    grid = (scott_factor(len(x), 2) * np.geomspace(0.02, 4.0, 24)).tolist()
    h_step, by_step = heldout_bandwidth(x, grid=grid, groups=None)
    h_episode, by_episode = heldout_bandwidth(x, grid=grid, groups=episodes)
    assert by_step["folds"] == "point" and by_episode["folds"] == "group" and by_episode["num_folds"] == 5
    assert not by_step["at_grid_edge"] and not by_episode["at_grid_edge"]
    # Measured: 0.049 with steps held out (the neighbours leak into training) vs 0.61 by episode.
    assert h_step < h_episode / 5
    with pytest.raises(ValueError, match="need at least 2 groups"):
        heldout_bandwidth(x, groups=np.zeros(len(x)))


def test_bandwidth_on_the_grid_edge_is_flagged_and_logged(caplog):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 2))
    with caplog.at_level("WARNING", logger="distcur.score.kde"):
        h, info = heldout_bandwidth(x, grid=[0.01, 0.02, 0.04])  # all far below the optimum (~0.5)
    assert h == 0.04 and info["at_grid_edge"]
    assert "h=0.04 is at the upper edge of the grid [0.01, 0.04]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="distcur.score.kde"):
        _, info = heldout_bandwidth(x)
    assert not info["at_grid_edge"] and not caplog.text


def test_constant_dimension_is_a_clear_error():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(100, 4))
    x[:, 2] = 1.5
    with pytest.raises(ValueError, match="dimension 2 is constant"):
        whitening(x, "prior")
    y = rng.normal(size=(100, 3))
    y = np.concatenate([y, y[:, :1] + 2 * y[:, 1:2]], 1)
    with pytest.raises(ValueError, match="dimension 3 is a linear combination"):
        whitening(y, "prior")


def test_bad_shapes_and_values_are_clear_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="queries: embedding dim 3 does not match the expected dim 4"):
        log_kde(rng.normal(size=(5, 3)), rng.normal(size=(20, 4)), 0.5)
    with pytest.raises(ValueError, match="non-finite value nan at row 1, dimension 0"):
        log_kde(np.array([[0.0, 0.0], [np.nan, 0.0]]), rng.normal(size=(20, 2)), 0.5)
    with pytest.raises(ValueError, match="bandwidth h must be a positive"):
        log_kde_partial_sums(rng.normal(size=(5, 2)), rng.normal(size=(5, 2)), 0.0)
    with pytest.raises(ValueError, match="expected a 2-D array"):
        log_kde(np.zeros(3), rng.normal(size=(20, 3)), 0.5)
