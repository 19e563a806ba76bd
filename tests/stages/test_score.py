"""The score stage: every scorer through the store and Ray equals its in-process maths; IWR's
sharded KDE (task grid and Ray Data), subsample error, resume and bad input."""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pytest

from distcur.data import embeddings_key
from distcur.methods import IwrConfig
from distcur.schema import EMBEDDING_SCHEMA, SCORE_SCHEMA
from distcur.score.iwr import iwr_log_weights
from distcur.score.nearest import nearest_scores
from distcur.score.strap import strap_scores
from distcur.stages.score import ScoreConfig, run, run_iwr
from distcur.store import Store

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from embedding_factory import prior_and_target_arrays, two_scipy_kdes, write_embeddings  # noqa: E402


def score(store: Store, method: str, target: str, out_run: str, prior_sources: list[str] | None = None, **options):
    """The stage's run for ``method`` with the scorer ``options``."""
    return run(store, ScoreConfig(method=method, target=target, run=out_run, prior_sources=prior_sources,
                                  scorer=options))


def iwr(store: Store, prior_keys: list[str], target_key: str, out_key: str, **options):
    """:func:`run_iwr` with the fields of an IwrConfig."""
    return run_iwr(store, prior_keys, target_key, out_key, IwrConfig(**options))


@pytest.fixture(scope="module")
def prior_and_target():
    return prior_and_target_arrays()


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
    manifest = iwr(store, keys, target_key, f"scores/iwr-{num_shards}", num_shards=num_shards)
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
    grid = iwr(store, keys, target_key, f"scores/grid-{mode}-{kernel}", executor="tasks", **opts)
    data = iwr(store, keys, target_key, f"scores/data-{mode}-{kernel}", executor="ray-data", **opts)
    assert (grid.metadata["executor"], data.metadata["executor"]) == ("tasks", "ray-data")
    assert data.metadata["tasks"] == {"load_and_target_sums": 3, "ray_data_query_blocks": 3}
    assert data.rows == grid.rows == 1200
    # the same kernels on the same blocks, combined the same way: equal to the last bit
    assert read_scores(store, f"scores/data-{mode}-{kernel}").equals(read_scores(store, f"scores/grid-{mode}-{kernel}"))
    assert data.metadata["log_w"] == grid.metadata["log_w"]
    if mode == "subsample":
        assert data.metadata["subsample"] == grid.metadata["subsample"]


def test_rerun_with_same_config_is_skipped(ray_session, store_with_embeddings):
    store, keys, target_key = store_with_embeddings
    first = iwr(store, keys, target_key, "scores/iwr-skip", bandwidth=0.7, num_shards=2)
    again = iwr(store, keys, target_key, "scores/iwr-skip", bandwidth=0.7, num_shards=2)
    assert again.created == first.created and again.fingerprint == first.fingerprint


def test_subsample_mode_reports_its_error(ray_session, store_with_embeddings, prior_and_target):
    store, keys, target_key = store_with_embeddings
    prior = np.concatenate(prior_and_target[:2])
    exact = iwr_log_weights(prior, prior_and_target[2], 0.5)
    manifest = iwr(store, keys, target_key, "scores/iwr-sub", bandwidth=0.5, mode="subsample", subsample=600,
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
    sub = iwr(store, keys, embeddings_key("test", "target-reach"), "scores/iwr-per-set-sub", kernel="per-set",
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
        manifest = iwr(store, keys, target_key, "scores/iwr-lik", bandwidth="likelihood", kernel="per-set",
                           num_shards=2)
    bw = manifest.metadata["bandwidth"]
    assert bw["folds"] == "group" and bw["num_folds"] == 4  # 4 episodes: one per fold
    assert manifest.metadata["bandwidth_at_grid_edge"] is True and bw["h_target"] == bw["grid"][0]
    assert "at the lower edge of the grid" in caplog.text
    assert manifest.config["heldout_folds"] == "episode"
    scott = iwr(store, keys, target_key, "scores/iwr-lik-scott", kernel="per-set", num_shards=2)
    assert scott.metadata["bandwidth_at_grid_edge"] is None


def test_bad_store_input_is_a_clear_error(ray_session, tmp_path):
    rng = np.random.default_rng(4)
    constant = rng.normal(size=(100, 4))
    constant[:, 1] = 0.25
    store = Store(tmp_path)
    prior_key = write_embeddings(store, "p", rng.normal(size=(200, 4)))
    other_key = write_embeddings(store, "q", rng.normal(size=(200, 5)))
    empty_key = embeddings_key("test", "empty")
    store.write_table(empty_key, EMBEDDING_SCHEMA.empty_table(), stage="embed")
    wrong_key = write_embeddings(store, "wrong", rng.normal(size=(20, 3)))
    const_key = write_embeddings(store, "const", constant)
    with pytest.raises(ValueError, match=r"target embeddings .*empty"):
        iwr(store, [prior_key], empty_key, "scores/x")
    with pytest.raises(ValueError, match=r"target embeddings .*source=wrong have dim 3 but the prior .* dim 4"):
        iwr(store, [prior_key], wrong_key, "scores/x")
    with pytest.raises(ValueError, match="mismatched dims"):
        iwr(store, [prior_key, other_key], wrong_key, "scores/x", num_shards=2)
    with pytest.raises(ValueError, match="dimension 1 is constant"):
        iwr(store, [const_key], prior_key, "scores/x")
    few_key = write_embeddings(store, "few", rng.normal(size=(3, 4)))
    with pytest.raises(ValueError, match=r"target embeddings .*source=few \(3 points in 4 dims\): .*singular"):
        iwr(store, [prior_key], few_key, "scores/x", kernel="per-set")
    with pytest.raises(ValueError, match="unknown IWR kernel 'own'"):
        iwr(store, [prior_key], prior_key, "scores/x", kernel="own")
    with pytest.raises(ValueError, match="mode='subsample' needs subsample"):
        iwr(store, [prior_key], prior_key, "scores/x", mode="subsample")
    with pytest.raises(ValueError, match="unknown IWR KDE executor 'dask'"):
        iwr(store, [prior_key], prior_key, "scores/x", executor="dask")
    with pytest.raises(ValueError, match="unknown bandwidth 'wide'"):
        iwr(store, [prior_key], prior_key, "scores/x", bandwidth="wide")
    with pytest.raises(FileNotFoundError, match="missing"):
        iwr(store, [prior_key], "embeddings/test/source=missing", "scores/x")
    assert store.manifest("scores/x") is None


# -- sr / ar / br / random and STRAP ------------------------------------------------------------
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
    from distcur.schema import SCORE_SCHEMA
    from distcur.stages.embed import EmbedConfig
    from distcur.stages.embed import run as run_embed
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
def hand_paths(rng, episodes: int, length: int) -> np.ndarray:
    """(episodes * length, 6) states: a hand position moving between waypoints with pauses, plus noise dims."""
    out = []
    for _ in range(episodes):
        waypoints = rng.uniform(-1, 1, size=(4, 3))
        legs = [np.linspace(waypoints[i], waypoints[i + 1], length // 3) for i in range(3)]
        pos = np.concatenate(legs)[:length]
        pos = np.concatenate([pos, np.repeat(pos[-1:], length - len(pos), 0)])
        out.append(np.concatenate([pos, rng.normal(scale=0.1, size=(length, 3))], 1))
    return np.concatenate(out).astype(np.float32)


def test_run_strap_equals_in_process_with_episodes_split_across_parts(tmp_path, ray_session):
    from distcur.data import load_steps, scores_key, steps_key
    from distcur.schema import steps_table
    from distcur.stages.embed import EmbedConfig
    from distcur.stages.embed import run as run_embed
    from distcur.store import Store

    rng = np.random.default_rng(0)
    store = Store(tmp_path / "store")
    length = 60
    target_state = hand_paths(rng, 2, length)
    prior_state = hand_paths(rng, 12, length)
    prior_state[:2 * length] = target_state + rng.normal(scale=1e-3, size=target_state.shape)  # two replays
    for source, state, part in (("metaworld", prior_state, 70), ("target-reach", target_state, 1000)):
        episodes = len(state) // length
        step = np.tile(np.arange(length), episodes)
        table = steps_table({"source": source, "episode": np.repeat(np.arange(episodes), length), "step": step,
                             "state": state, "action": rng.normal(size=(len(state), 2)).astype(np.float32),
                             "is_first": step == 0, "is_last": step == length - 1,
                             "is_terminal": step == length - 1})
        store.write_table(steps_key(source), table, "ingest", {}, rows_per_part=part)
    target = load_steps(store, ["target-reach"])
    run_embed(store, EmbedConfig(encoder="state", batch_size=50))

    m = score(store, "strap", "reach", "strap-run", encoder="state", k=6, min_length=15)
    got = store.read_table(scores_key("strap-run")).sort_by([("episode", "ascending"), ("step", "ascending")])
    prior = load_steps(store, ["metaworld"])
    expected, kept = strap_scores(prior.state, prior.episode, prior.step, target.state, target.state[:, :3],
                                  target.episode, target.step, k=6, min_length=15, source="metaworld")
    order = np.lexsort((prior.step, prior.episode))
    np.testing.assert_allclose(got.column("score").to_numpy(), expected[order], rtol=1e-9, atol=1e-12)
    assert m.metadata["segments"] == len({(x.segment) for x in kept}) >= 2
    assert [(x["episode"], x["start_step"], x["end_step"]) for x in m.metadata["kept"]] == \
        [(x.episode, x.start_step, x.end_step) for x in kept]
    assert {x.episode for x in kept} <= {0, 1} and np.isfinite(got.column("score").to_numpy()).all()
    with pytest.raises(FileNotFoundError, match="embeddings/vae"):
        score(store, "strap", "reach", "strap-bad")  # default encoder vae was never embedded
    from distcur.data import embeddings_key
    from distcur.schema import EMBEDDING_SCHEMA, STEP_SCHEMA

    store.write_table(steps_key("target-empty"), STEP_SCHEMA.empty_table(), "ingest", {})
    store.write_table(embeddings_key("state", "target-empty"), EMBEDDING_SCHEMA.empty_table(), "embed", {})
    with pytest.raises(ValueError, match=r"STRAP: the target set .*steps/source=target-empty is empty; need at least one "
                                         r"target demo of 'empty'"):
        score(store, "strap", "empty", "strap-empty", encoder="state")
