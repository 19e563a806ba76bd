"""STRAP: segmentation, subsequence DTW against brute force, top-k matching, step scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from distcur.score.strap import (
    Match,
    match_step_scores,
    segment_by_speed,
    step_scores_from_matches,
    strap_scores,
    subsequence_dtw,
    subsequence_dtw_batch,
    top_k_matches,
)


def brute_force_subsequence_dtw(query, series):
    """Minimum over every start column and every sequence of prior steps in {1, 2} of the path cost."""
    n, m = len(query), len(series)
    C = np.sqrt(((query[:, None, :].astype(np.float64) - series[None].astype(np.float64)) ** 2).sum(-1))
    best = (np.inf, -1, -1)
    for start in range(m):
        for jumps in itertools.product((1, 2), repeat=n - 1):
            cols = np.cumsum((start, *jumps))
            if cols[-1] >= m:
                continue
            cost = C[np.arange(n), cols].sum()
            if cost < best[0] - 1e-12:
                best = (cost, start, int(cols[-1]))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_subsequence_dtw_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    m = int(rng.integers(n, 11))
    query = rng.normal(size=(n, 2))
    series = rng.normal(size=(m, 2))
    cost, start, end = subsequence_dtw(query, series)
    bf_cost, _, bf_end = brute_force_subsequence_dtw(query, series)
    assert cost == pytest.approx(bf_cost, rel=1e-9, abs=1e-9)
    # the reported window admits a path of that cost
    C = np.sqrt(((query[:, None] - series[None]) ** 2).sum(-1))
    window = brute_force_subsequence_dtw(query, series[start:end + 1])
    assert window[0] == pytest.approx(cost, rel=1e-9, abs=1e-9)
    assert C.shape == (n, m) and 0 <= start <= end < m and end - start + 1 >= n
    assert end == bf_end or cost == pytest.approx(brute_force_subsequence_dtw(query, series[:end + 1])[0])


def test_batched_dtw_equals_single_and_short_series_have_no_match():
    rng = np.random.default_rng(7)
    query = rng.normal(size=(4, 3))
    series = [rng.normal(size=(L, 3)) for L in (9, 4, 3, 12)]
    padded = np.zeros((4, 12, 3))
    for e, s in enumerate(series):
        padded[e, :len(s)] = s
    cost, start, end = subsequence_dtw_batch(query, padded, np.array([len(s) for s in series]))
    for e, s in enumerate(series):
        if len(s) < len(query):
            assert cost[e] == np.inf and start[e] == -1 and end[e] == -1
        else:
            assert (cost[e], start[e], end[e]) == pytest.approx(subsequence_dtw(query, s))


def test_exact_copy_is_found_at_zero_cost():
    rng = np.random.default_rng(8)
    series = rng.normal(size=(40, 4))
    cost, start, end = subsequence_dtw(series[12:25], series)
    assert cost == pytest.approx(0.0, abs=1e-6) and (start, end) == (12, 24)


def test_segmentation_respects_min_length_and_covers_the_demo():
    rng = np.random.default_rng(9)
    T = 237
    velocity = rng.uniform(0.01, 0.02, size=(T, 3)) * rng.choice([-1, 1], size=(T, 3))
    stops = rng.choice(T - 1, size=25, replace=False)
    velocity[stops] = 0.0  # the hand pauses at 25 random steps
    positions = np.cumsum(velocity, axis=0)
    for min_length in (1, 5, 20, 60):
        segs = segment_by_speed(positions, threshold=5e-3, min_length=min_length)
        assert segs[0][0] == 0 and segs[-1][1] == T
        assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
        assert all(e - s >= min_length for s, e in segs)
    assert len(segment_by_speed(positions, 5e-3, 1)) > len(segment_by_speed(positions, 5e-3, 20)) > 1
    assert segment_by_speed(positions[:10], 5e-3, 20) == [(0, 10)]  # shorter than min_length: one segment


def test_top_k_split_across_segments_and_step_scores():
    matches = [Match(q, "p", ep, 0, 4, cost=float(ep + q), query_length=5) for q in range(2) for ep in range(10)]
    kept = top_k_matches(matches, n_segments=2, k=6)
    assert sorted((m.segment, m.episode) for m in kept) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len(top_k_matches(matches, n_segments=2, k=1)) == 2  # at least one per segment
    ep = np.repeat(np.arange(3), 8)
    st = np.tile(np.arange(8), 3)
    s = step_scores_from_matches("p", ep, st, kept)
    assert s[(ep == 0) & (st <= 4)].tolist() == [1.0] * 5  # best covering match: cost 0
    assert np.all(s[st > 4] == 0.0) and s.max() <= 1.0 and s.min() >= 0.0
    assert s[(ep == 2) & (st == 0)][0] == pytest.approx(1 / (1 + 2 / 5))


def test_rank_scoring_fills_a_budget_round_robin_over_segments_and_padding():
    """With every match kept and ranked within its segment, a budget takes each segment's best match
    before any segment's second best (the reference's top k split evenly across segments), even when
    one segment's matches are all cheaper."""
    matches = [Match(0, "p", ep, 0, 9, cost=0.1 * ep, query_length=5) for ep in range(4)]
    matches += [Match(1, "p", 4 + ep, 0, 9, cost=10 + ep, query_length=5) for ep in range(4)]
    kept = top_k_matches(matches, n_segments=2, k=None)
    assert len(kept) == 8
    ranked = sorted(zip(match_step_scores(kept, "rank"), [(m.segment, m.episode) for m in kept]), reverse=True)
    assert [x[1] for x in ranked[:4]] == [(0, 0), (1, 4), (0, 1), (1, 5)]
    by_cost = sorted(zip(match_step_scores(kept, "cost"), [m.episode for m in kept]), reverse=True)
    assert [e for _, e in by_cost[:4]] == [0, 1, 2, 3]  # cost alone takes segment 0's four first
    ep, st = np.zeros(20, np.int64), np.arange(20)
    padded = step_scores_from_matches("p", ep, st, [Match(0, "p", 0, 8, 10, 0.0, 3)], padding=5)
    assert np.flatnonzero(padded).tolist() == list(range(3, 16))
    with pytest.raises(ValueError, match="scoring must be one of"):
        match_step_scores(kept, "best")


def test_strap_scores_retrieve_the_matching_episode():
    rng = np.random.default_rng(10)
    # target demo: a hand path with one pause in the middle; prior: noise episodes plus one near copy
    t = np.linspace(0, 1, 60)[:, None]
    pos = np.concatenate([t * [1, 0, 0], np.ones((1, 3)) * [1, 0, 0], 1 + t * [0, 1, 0]])[:, :3]
    target_z = np.concatenate([pos, np.sin(5 * pos[:, :1])], axis=1)
    ep_t = np.zeros(len(pos), np.int64)
    st_t = np.arange(len(pos))
    prior = [rng.normal(size=(200, 4)) for _ in range(5)]
    prior[3][20:20 + len(pos)] = target_z + rng.normal(scale=1e-3, size=target_z.shape)
    prior_z = np.concatenate(prior)
    ep_p = np.repeat(np.arange(5), 200)
    st_p = np.tile(np.arange(200), 5)
    scores, kept = strap_scores(prior_z, ep_p, st_p, target_z, pos, ep_t, st_t, k=2, min_length=20)
    assert len(kept) == 2 and {m.episode for m in kept} == {3}
    assert np.isfinite(scores).all() and scores[ep_p == 3].max() > 0.9
    assert scores[(ep_p == 3) & (st_p >= 25) & (st_p < 135)].min() > 0.9
    with pytest.raises(ValueError, match="target set is empty"):
        strap_scores(prior_z, ep_p, st_p, target_z[:0], pos[:0], ep_t[:0], st_t[:0])
    with pytest.raises(ValueError, match="dim 4 but target embeddings have dim 3"):
        strap_scores(prior_z, ep_p, st_p, target_z[:, :3], pos, ep_t, st_t)
