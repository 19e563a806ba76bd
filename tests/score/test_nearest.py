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


# -- end to end through the store and Ray ----------------------------------------------------------
def write_source(store, source: str, episodes: int, length: int, seed: int, rows_per_part: int,
                 state_dim: int = 6) -> None:
    from distcur.data import steps_key
    from distcur.schema import steps_table

    rng = np.random.default_rng(seed)
    n = episodes * length
    state = rng.normal(size=(n, state_dim)).astype(np.float32)
    action = rng.normal(size=(n, 2)).astype(np.float32)
    step = np.tile(np.arange(length), episodes)
    table = steps_table({"source": source, "episode": np.repeat(np.arange(episodes), length), "step": step,
                         "state": state, "action": action,
                         "is_first": step == 0, "is_last": step == length - 1, "is_terminal": step == length - 1})
    store.write_table(steps_key(source), table, "ingest", {"seed": seed}, rows_per_part=rows_per_part)


def test_score_runs_equal_in_process_scores(tmp_path, ray_session):
    from distcur.data import embeddings_key, load_steps, scores_key
    from distcur.distributed.embed import EmbedConfig, run_embed
    from distcur.distributed.score import score
    from distcur.schema import SCORE_SCHEMA
    from distcur.store import Store

    store = Store(tmp_path / "store")
    write_source(store, "metaworld", episodes=10, length=40, seed=0, rows_per_part=130)
    write_source(store, "other", episodes=3, length=40, seed=2, rows_per_part=1000)
    write_source(store, "target-reach", episodes=2, length=40, seed=1, rows_per_part=1000)
    run_embed(store, EmbedConfig(encoder="state-action", sources=["metaworld", "target-reach"], batch_size=64))
    target = load_steps(store, ["target-reach"])
    for method in ("sr", "ar", "br"):
        # br reads the embeddings, made for "metaworld" only; sr / ar read every prior step table
        opts = {"encoder": "state-action", "prior_sources": ["metaworld"]} if method == "br" else {}
        prior = load_steps(store, ["metaworld"] if method == "br" else ["metaworld", "other"])
        p, t = {"sr": (prior.state, target.state), "ar": (prior.action, target.action),
                "br": (np.concatenate([prior.state, prior.action], 1),
                       np.concatenate([target.state, target.action], 1))}[method]
        m = score(store, method, "reach", f"{method}-run", block=37, **opts)
        got = store.read_table(scores_key(f"{method}-run"))
        assert got.schema.equals(SCORE_SCHEMA, check_metadata=False) and m.rows == len(prior) == got.num_rows
        expected = nearest_scores(p, t)
        lookup = {(s, e, st): v for s, e, st, v in zip(prior.source, prior.episode, prior.step, expected)}
        for s, e, st, v, meth in zip(*(got.column(c).to_pylist() for c in ("source", "episode", "step", "score",
                                                                          "method"))):
            assert meth == method and v == pytest.approx(lookup[(s, e, st)], abs=1e-9)
    # resume: same config and inputs -> the committed output is returned as is
    assert score(store, "sr", "reach", "sr-run", block=37).created == store.manifest(scores_key("sr-run")).created
    m = score(store, "random", "reach", "random-run", seed=5)
    rnd = store.read_table(scores_key("random-run"))
    assert m.rows == 13 * 40 and 0.0 <= min(rnd.column("score").to_pylist()) < 1.0
    # bad input: a target whose state has another dimension
    write_source(store, "target-wide", episodes=1, length=40, seed=3, rows_per_part=1000, state_dim=7)
    with pytest.raises(ValueError, match="prior has dim 6 but target has dim 7"):
        score(store, "sr", "wide", "bad-run")
    with pytest.raises(FileNotFoundError, match="target-missing"):
        score(store, "br", "missing", "bad-run", encoder="state-action", prior_sources=["metaworld"])
    with pytest.raises(FileNotFoundError, match="random: --target 'missing' has no target demos at .*target-missing"):
        score(store, "random", "missing", "bad-run")
    with pytest.raises(ValueError, match="unknown score method"):
        score(store, "knn", "reach", "bad-run")
    assert store.manifest(scores_key("bad-run")) is None
    assert store.manifest(embeddings_key("state-action", "metaworld")).rows == 400
