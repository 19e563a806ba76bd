"""IWR: density-ratio maths, the sharded Ray computation, subsample mode, store I/O and bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.stats as st

from distcur.data import embeddings_key
from distcur.schema import EMBEDDING_SCHEMA, SCORE_SCHEMA
from distcur.score.iwr import iwr_log_weights, run_iwr
from distcur.score.kde import whitening
from distcur.store import Store


def embedding_table(z: np.ndarray, source: str, episode_len: int = 50) -> pa.Table:
    n, d = z.shape
    idx = np.arange(n)
    flat = pa.array(np.ascontiguousarray(z, dtype=np.float32).ravel())
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    return pa.Table.from_arrays(
        [pa.array([source] * n), pa.array(idx // episode_len, pa.int64()), pa.array(idx % episode_len, pa.int32()),
         pa.ListArray.from_arrays(offsets, flat)],
        schema=EMBEDDING_SCHEMA,
    )


def write_embeddings(store: Store, source: str, z: np.ndarray, rows_per_part: int = 1_000_000) -> str:
    key = embeddings_key("test", source)
    store.write_table(key, embedding_table(z, source), stage="embed", rows_per_part=rows_per_part)
    return key


@pytest.fixture(scope="module")
def prior_and_target():
    rng = np.random.default_rng(0)
    mix = np.linalg.cholesky(np.array([[1.0, 0.5, 0.0, 0.2], [0.5, 1.0, 0.1, 0.0], [0.0, 0.1, 1.0, 0.3],
                                       [0.2, 0.0, 0.3, 1.0]]))
    prior_a = rng.normal(size=(700, 4)) @ mix.T
    prior_b = rng.normal(size=(500, 4)) @ mix.T * 1.5 + 1.0
    target = rng.normal(size=(150, 4)) * 0.4 + np.array([1.0, 0.5, 0.0, -0.5])
    return prior_a, prior_b, target


@pytest.fixture(scope="module")
def store_with_embeddings(tmp_path_factory, prior_and_target):
    prior_a, prior_b, target = prior_and_target
    store = Store(tmp_path_factory.mktemp("iwr-store"))
    keys = [write_embeddings(store, "a", prior_a, rows_per_part=300), write_embeddings(store, "b", prior_b)]
    target_key = write_embeddings(store, "target", target)
    return store, keys, target_key


def read_scores(store: Store, key: str) -> pa.Table:
    return store.read_table(key).sort_by([("source", "ascending"), ("episode", "ascending"), ("step", "ascending")])


@pytest.mark.parametrize("num_shards", [1, 2, 5])
def test_sharded_ray_equals_single_process(ray_session, store_with_embeddings, prior_and_target, num_shards):
    store, keys, target_key = store_with_embeddings
    prior = np.concatenate(prior_and_target[:2])
    expected = iwr_log_weights(prior, prior_and_target[2], "scott")
    manifest = run_iwr(store, keys, target_key, f"scores/iwr-{num_shards}", num_shards=num_shards)
    assert manifest.rows == len(prior)
    assert manifest.metadata["num_shards"] == num_shards
    table = read_scores(store, f"scores/iwr-{num_shards}")
    assert table.schema.equals(SCORE_SCHEMA)
    assert set(table.column("method").to_pylist()) == {"iwr"}
    # Row order of the expected array is source a then b, episode, step: the same as the sorted table.
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, rtol=1e-5, atol=1e-4)
    assert set(manifest.inputs) == set(keys) | {target_key}
    assert manifest.metadata["bandwidth"]["h_prior"] == pytest.approx(1200 ** (-1 / 8))


@pytest.mark.parametrize(("mode", "kernel"), [("exact", "shared-prior"), ("subsample", "shared-prior")])
def test_ray_data_executor_gives_the_task_grid_scores(ray_session, store_with_embeddings, mode, kernel):
    store, keys, target_key = store_with_embeddings
    opts = {"mode": mode, "kernel": kernel, "num_shards": 3, **({"subsample": 400} if mode == "subsample" else {})}
    grid = run_iwr(store, keys, target_key, f"scores/grid-{mode}-{kernel}", executor="tasks", **opts)
    data = run_iwr(store, keys, target_key, f"scores/data-{mode}-{kernel}", executor="ray-data", **opts)
    assert (grid.metadata["executor"], data.metadata["executor"]) == ("tasks", "ray-data")
    assert data.metadata["tasks"] == {"load_and_target_sums": 3, "ray_data_query_blocks": 3}
    assert data.rows == grid.rows == 1200
    # the same kernels on the same blocks, combined the same way: equal to the last bit
    assert read_scores(store, f"scores/data-{mode}-{kernel}").equals(read_scores(store, f"scores/grid-{mode}-{kernel}"))
    assert data.metadata["log_w"] == grid.metadata["log_w"]
    if mode == "subsample":
        assert data.metadata["subsample"] == grid.metadata["subsample"]


def test_ray_data_block_refuses_a_batch_of_two_query_blocks(tmp_path):
    from distcur.distributed.kde import _score_block

    batch = pa.table({"block": [0, 1], "source": ["a", "a"], "episode": [0, 0], "step": [0, 1],
                      "y": pa.FixedSizeListArray.from_arrays(pa.array([0.0, 1.0], pa.float32()), 1),
                      "lse_target": [0.0, 0.0]})
    with pytest.raises(RuntimeError, match=r"spans query blocks \[0, 1\]; expected exactly one"):
        _score_block(batch, Store(tmp_path), "data", [], 1.0, 0.0, 0, 2)


def test_rerun_with_same_config_is_skipped(ray_session, store_with_embeddings):
    store, keys, target_key = store_with_embeddings
    first = run_iwr(store, keys, target_key, "scores/iwr-skip", bandwidth=0.7, num_shards=2)
    again = run_iwr(store, keys, target_key, "scores/iwr-skip", bandwidth=0.7, num_shards=2)
    assert again.created == first.created and again.fingerprint == first.fingerprint


def test_subsample_mode_reports_its_error(ray_session, store_with_embeddings, prior_and_target):
    store, keys, target_key = store_with_embeddings
    prior = np.concatenate(prior_and_target[:2])
    exact = iwr_log_weights(prior, prior_and_target[2], 0.5)
    manifest = run_iwr(store, keys, target_key, "scores/iwr-sub", bandwidth=0.5, mode="subsample", subsample=600,
                       num_shards=3)
    err = manifest.metadata["subsample"]
    assert err["size"] == 600 and err["probe_points"] == 256
    est, meas = err["estimated_relative_std"], err["measured_relative_error"]
    assert 0 < est["median"] < 0.5 and 0 < meas["median"] < 0.5
    # The predicted std and the measured error agree in scale (|error| ~ 0.8 std for a normal error).
    assert 0.3 < meas["median"] / est["median"] < 3.0
    got = read_scores(store, "scores/iwr-sub").column("score").to_numpy()
    assert np.all(np.isfinite(got))
    # Unbiased density, so log w is close to exact and ranks nearly the same.
    assert np.corrcoef(got, exact)[0, 1] > 0.95


def two_scipy_kdes(prior: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The reference per-set log-ratio: two independent scipy KDEs (own covariance, Scott's rule)."""
    return st.gaussian_kde(target.T).logpdf(prior.T) - st.gaussian_kde(prior.T).logpdf(prior.T)


def test_per_set_kernel_equals_two_scipy_gaussian_kdes(prior_and_target):
    prior, target = np.concatenate(prior_and_target[:2]), prior_and_target[2]
    expected = two_scipy_kdes(prior, target)
    # Measured: max |error| 3e-5 on log-ratios spanning -366..4 (float32 kernel sums).
    np.testing.assert_allclose(iwr_log_weights(prior, target, "scott", kernel="per-set"), expected,
                               rtol=1e-6, atol=1e-4)
    # The shared prior whitening is a different estimator here (the target is 0.4x the prior's scale).
    assert np.abs(iwr_log_weights(prior, target, "scott") - expected).max() > 10


def test_per_set_kernel_on_ray_equals_two_scipy_gaussian_kdes(ray_session, store_with_embeddings,
                                                              prior_and_target, capsys):
    from distcur.cli import main

    store, keys, _ = store_with_embeddings
    prior, target = np.concatenate(prior_and_target[:2]), prior_and_target[2]
    expected = two_scipy_kdes(prior, target)
    write_embeddings(store, "target-reach", target)
    # The CLI -> score() -> run_iwr path, exact mode over 3 shards.
    assert main(["score", "--store", store.uri, "--method", "iwr", "--target", "reach", "--run", "iwr-per-set",
                 "--encoder", "test", "--prior-sources", "a", "b", "--iwr-kernel", "per-set",
                 "--num-shards", "3"]) == 0
    manifest = store.manifest("scores/iwr-per-set")
    assert manifest.config["kernel"] == manifest.metadata["kernel"] == "per-set"
    assert manifest.metadata["tasks"] == {"load_and_target_sums": 3, "partial_sums": 9, "combine": 3}
    got = read_scores(store, "scores/iwr-per-set").column("score").to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
    # --kde-executor ray-data: the same table through Ray Data
    assert main(["score", "--store", store.uri, "--method", "iwr", "--target", "reach", "--run", "iwr-per-set-rd",
                 "--encoder", "test", "--prior-sources", "a", "b", "--iwr-kernel", "per-set",
                 "--num-shards", "3", "--kde-executor", "ray-data"]) == 0
    assert store.manifest("scores/iwr-per-set-rd").metadata["executor"] == "ray-data"
    assert read_scores(store, "scores/iwr-per-set-rd").equals(read_scores(store, "scores/iwr-per-set"))
    # Subsample mode keeps the per-set target KDE; with every prior point as a reference it is exact.
    sub = run_iwr(store, keys, embeddings_key("test", "target-reach"), "scores/iwr-per-set-sub", kernel="per-set",
                  mode="subsample", subsample=len(prior), num_shards=2)
    assert sub.metadata["subsample"]["size"] == len(prior)
    got = read_scores(store, "scores/iwr-per-set-sub").column("score").to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
    assert main(["score", "--store", store.uri, "--method", "sr", "--target", "reach", "--run", "r",
                 "--iwr-kernel", "per-set"]) == 2
    assert "--iwr-kernel" in capsys.readouterr().err


def test_likelihood_bandwidth_holds_out_target_episodes_and_flags_the_grid_edge(
        ray_session, store_with_embeddings, caplog):
    # Target points drawn i.i.d. from 5 tight clusters, 4 episodes of 50: the held-out optimum
    # (~ the clusters' width) is far below the default grid's 0.25x Scott lower edge.
    store, keys, _ = store_with_embeddings
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(5, 4)) * 3.0
    target = centres[rng.integers(0, 5, 200)] + rng.normal(size=(200, 4)) * 0.01
    target_key = write_embeddings(store, "clusters", target)
    with caplog.at_level("WARNING", logger="distcur.score.kde"):
        manifest = run_iwr(store, keys, target_key, "scores/iwr-lik", bandwidth="likelihood", kernel="per-set",
                           num_shards=2)
    bw = manifest.metadata["bandwidth"]
    assert bw["folds"] == "group" and bw["num_folds"] == 4  # 4 episodes: one per fold
    assert manifest.metadata["bandwidth_at_grid_edge"] is True and bw["h_target"] == bw["grid"][0]
    assert "at the lower edge of the grid" in caplog.text
    assert manifest.config["heldout_folds"] == "episode"
    scott = run_iwr(store, keys, target_key, "scores/iwr-lik-scott", kernel="per-set", num_shards=2)
    assert scott.metadata["bandwidth_at_grid_edge"] is None


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


def test_bad_input_is_a_clear_error(ray_session, tmp_path):
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

    store = Store(tmp_path)
    prior_key = write_embeddings(store, "p", rng.normal(size=(200, 4)))
    other_key = write_embeddings(store, "q", rng.normal(size=(200, 5)))
    empty_key = embeddings_key("test", "empty")
    store.write_table(empty_key, EMBEDDING_SCHEMA.empty_table(), stage="embed")
    wrong_key = write_embeddings(store, "wrong", rng.normal(size=(20, 3)))
    const_key = write_embeddings(store, "const", constant)
    with pytest.raises(ValueError, match=r"target embeddings .*empty"):
        run_iwr(store, [prior_key], empty_key, "scores/x")
    with pytest.raises(ValueError, match=r"target embeddings .*source=wrong have dim 3 but the prior .* dim 4"):
        run_iwr(store, [prior_key], wrong_key, "scores/x")
    with pytest.raises(ValueError, match="mismatched dims"):
        run_iwr(store, [prior_key, other_key], wrong_key, "scores/x", num_shards=2)
    with pytest.raises(ValueError, match="dimension 1 is constant"):
        run_iwr(store, [const_key], prior_key, "scores/x")
    few_key = write_embeddings(store, "few", rng.normal(size=(3, 4)))
    with pytest.raises(ValueError, match=r"target embeddings .*source=few \(3 points in 4 dims\): .*singular"):
        run_iwr(store, [prior_key], few_key, "scores/x", kernel="per-set")
    with pytest.raises(ValueError, match="unknown IWR kernel 'own'"):
        run_iwr(store, [prior_key], prior_key, "scores/x", kernel="own")
    with pytest.raises(ValueError, match="mode='subsample' needs subsample"):
        run_iwr(store, [prior_key], prior_key, "scores/x", mode="subsample")
    with pytest.raises(ValueError, match="unknown IWR KDE executor 'dask'"):
        run_iwr(store, [prior_key], prior_key, "scores/x", executor="dask")
    with pytest.raises(ValueError, match="unknown bandwidth 'wide'"):
        run_iwr(store, [prior_key], prior_key, "scores/x", bandwidth="wide")
    with pytest.raises(FileNotFoundError, match="missing"):
        run_iwr(store, [prior_key], "embeddings/test/source=missing", "scores/x")
    assert store.manifest("scores/x") is None
