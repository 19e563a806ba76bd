"""Subset models over Ray tasks: resume by completed-bitmap after a killed worker, and the
``distcur datamodel`` command end to end on a small synthetic prior."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from distcur.cli import main
from distcur.commands.datamodel import (
    METAGRAD_PRESETS,
    _prepare,
    make_config,
    resolve_inject_target,
    run_datamodel,
)
from distcur.data import steps_key, target_source
from distcur.distributed.datamodels import (
    BatchesFailed,
    SubsetTrainSettings,
    batch_key,
    completed_bitmap,
)
from distcur.policy.functional import AdamConfig, PolicySpec
from distcur.schema import SCORE_SCHEMA, steps_table
from distcur.store import Store

TASK = "synth-reach"
DS, DA, LENGTH = 6, 2, 30


def _episodes(source: str, signs: np.ndarray, rng: np.random.Generator):
    """Episodes whose actions follow +A s (the target's behaviour) or -A s (the opposite)."""
    a_true = np.random.default_rng(123).normal(size=(DA, DS)) / np.sqrt(DS)
    n = len(signs) * LENGTH
    states = rng.normal(size=(n, DS)).astype(np.float32)
    sign = np.repeat(signs, LENGTH)[:, None]
    actions = np.tanh(sign * 2 * states @ a_true.T + 0.1 * rng.normal(size=(n, DA))).astype(np.float32)
    step = np.tile(np.arange(LENGTH), len(signs))
    return steps_table({
        "source": source, "episode": np.repeat(np.arange(len(signs)), LENGTH), "step": step,
        "task": [TASK] * n, "state": states, "action": actions, "is_first": step == 0,
        "is_last": step == LENGTH - 1, "is_terminal": np.zeros(n, bool), "success": np.repeat(signs > 0, LENGTH),
    })


def make_synthetic_store(root, n_prior: int = 24, seed: int = 0) -> tuple[Store, np.ndarray]:
    """A prior whose even episodes demonstrate the target's behaviour and odd ones its opposite."""
    rng = np.random.default_rng(seed)
    good = np.arange(n_prior) % 2 == 0
    store = Store(str(root))
    store.write_table(steps_key("metaworld"), _episodes("metaworld", np.where(good, 1.0, -1.0), rng), stage="ingest")
    store.write_table(steps_key(target_source(TASK)), _episodes(target_source(TASK), np.ones(4), rng), stage="ingest")
    return store, good


SMALL = {
    "hidden": [16, 16],
    "batch_size": 64,
    "lr": 3e-3,
    "regression": {"num_models": 24, "heldout_models": 8, "steps": 60, "models_per_batch": 8, "cv_folds": 3},
    "metagrad": {"total_steps": 100, "meta_steps": 12, "iterations": 4},
}


def test_killed_worker_loses_only_its_batch_and_rerun_gives_same_tau(ray_session, tmp_path):
    store, _ = make_synthetic_store(tmp_path / "a")
    cfg = make_config(SMALL)
    marker = tmp_path / "kill"
    marker.write_text("2")
    with pytest.raises(BatchesFailed, match=r"1 of 4 batches failed \[2\]"):
        run_datamodel(store, "regression", TASK, "dm", cfg, fault_marker=str(marker))
    committed = [store.manifest(batch_key("dm", i)) is not None for i in range(4)]
    assert committed == [True, True, False, True]
    assert store.manifest("scores/dm") is None
    first = {i: store.manifest(batch_key("dm", i)).created for i in (0, 1, 3)}

    marker.unlink()
    m = run_datamodel(store, "regression", TASK, "dm", cfg)
    assert m.metadata["trained"] == 1 and m.metadata["skipped"] == 3
    assert {i: store.manifest(batch_key("dm", i)).created for i in (0, 1, 3)} == first
    tau = store.read_table("datamodels/dm/tau").column("tau").to_numpy()

    clean_store, _ = make_synthetic_store(tmp_path / "b")
    run_datamodel(clean_store, "regression", TASK, "dm", cfg)
    np.testing.assert_allclose(tau, clean_store.read_table("datamodels/dm/tau").column("tau").to_numpy(),
                               rtol=1e-6, atol=1e-9)
    # The bitmap is full, and a third run is skipped as up to date.
    again = run_datamodel(store, "regression", TASK, "dm", cfg)
    assert again.created == m.created


def test_bitmap_ignores_batches_made_with_another_config(ray_session, tmp_path):
    store, _ = make_synthetic_store(tmp_path)
    cfg = make_config(SMALL)
    run_datamodel(store, "regression", TASK, "dm", cfg)
    masks = np.zeros((32, 24), bool)
    spec = PolicySpec(DS, DA, (16, 16))
    inputs = {steps_key(s): store.input_fingerprint(steps_key(s)) for s in ("metaworld", target_source(TASK))}
    other = SubsetTrainSettings(spec, AdamConfig(lr=3e-3), 61, 64, 0.25, 0)
    assert not completed_bitmap(store, "dm", np.arange(32), masks, other, 8, inputs).any()


# Enough subset models that tau ranks 24 clusters (24 models gave Spearman 0.47 with the mse proxy).
RANKING = {**SMALL, "regression": {**SMALL["regression"], "num_models": 64, "models_per_batch": 16}}


def test_scores_rank_the_targets_behaviour_first(ray_session, tmp_path, capsys):
    """Both estimators through the CLI: per-step SCORE_SCHEMA rows; episodes demonstrating the
    target's behaviour score above those demonstrating its opposite."""
    store, good = make_synthetic_store(tmp_path)
    cfg_path = tmp_path / "dm.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(RANKING))
    for estimator in ("regression", "metagrad"):
        rc = main(["datamodel", "--estimator", estimator, "--store", str(tmp_path), "--target", TASK,
                   "--run", f"dm-{estimator}", "--config", str(cfg_path), "--cluster", "episode"])
        assert rc == 0
        scores = store.read_table(f"scores/dm-{estimator}")
        assert scores.schema.equals(SCORE_SCHEMA)
        assert scores.num_rows == 24 * LENGTH
        assert set(scores.column("method").to_pylist()) == {f"datamodel-{estimator}"}
        per_episode = scores.group_by("episode").aggregate([("score", "mean")]).sort_by("episode")
        s = per_episode.column("score_mean").to_numpy()
        assert spearmanr(s, good).statistic > 0.5, (estimator, s)
    assert "LDS" in capsys.readouterr().out
    assert store.manifest("datamodels/dm-regression/tau").metadata["lds"] > 0.3


def test_cross_fit_swaps_the_target_halves_and_still_ranks(ray_session, tmp_path):
    """With ``cross_fit`` the two folds inject and score on opposite target halves; half the
    models train in each fold (batches under ``fold=<f>``), tau explains both folds, and the
    good episodes still rank first for both estimators."""
    store, good = make_synthetic_store(tmp_path)
    cfg = make_config(RANKING, cross_fit=True, inject_target=True)
    _, _, folds, _ = _prepare(store, cfg, TASK, True)
    assert len(folds) == 2
    inject = [f.obs[f.group < 0] for f in folds]
    np.testing.assert_array_equal(inject[0], folds[1].proxy_obs)
    np.testing.assert_array_equal(inject[1], folds[0].proxy_obs)
    for estimator in ("regression", "metagrad"):
        m = run_datamodel(store, estimator, TASK, f"cf-{estimator}", cfg)
        per_episode = store.read_table(f"scores/cf-{estimator}").group_by("episode").aggregate(
            [("score", "mean")]).sort_by("episode")
        assert spearmanr(per_episode.column("score_mean").to_numpy(), good).statistic > 0.5, estimator
    results = store.read_table("datamodels/cf-regression/results")
    r = RANKING["regression"]
    assert results.column("model").to_pylist() == list(range(r["num_models"] + r["heldout_models"]))
    assert results.column("fold").to_pylist() == [i % 2 for i in range(r["num_models"] + r["heldout_models"])]
    assert store.exists(batch_key("cf-regression/fold=1", 0))
    assert len(store.manifest("datamodels/cf-regression/tau").metadata["folds"]) == 2
    assert m.metadata["folds"] == 2 and m.metadata["iterations"] == SMALL["metagrad"]["iterations"]


def test_inject_target_auto_follows_the_paper_per_setting(tmp_path):
    """auto: no injection for simulated MetaWorld priors (by name or by the ingest stage), half the
    target demos otherwise; without injection one fold trains on the prior alone and the proxy is
    every target demo."""
    store, _ = make_synthetic_store(tmp_path)
    rng = np.random.default_rng(1)
    store.write_table(steps_key("sim-copy"), _episodes("sim-copy", np.ones(2), rng), stage="ingest-metaworld")
    store.write_table(steps_key("robot"), _episodes("robot", np.ones(2), rng), stage="ingest-rlds")
    for sources, want in [(("metaworld",), False), (("metaworld", "sim-copy"), False), (("metaworld", "robot"), True)]:
        assert resolve_inject_target(store, make_config(prior_sources=sources)) is want, sources
    assert resolve_inject_target(store, make_config(inject_target=True)) is True
    assert resolve_inject_target(store, make_config(prior_sources=("robot",), inject_target=False)) is False

    _, _, folds, _ = _prepare(store, make_config(), TASK, False)
    assert len(folds) == 1 and (folds[0].group >= 0).all() and len(folds[0].proxy_obs) == 4 * LENGTH
    _, _, folds, _ = _prepare(store, make_config(), TASK, True)
    assert (folds[0].group == -1).sum() == 2 * LENGTH and len(folds[0].proxy_obs) == 2 * LENGTH
    with pytest.raises(ValueError, match="cross_fit needs target injection"):
        _prepare(store, make_config(cross_fit=True), TASK, False)
    with pytest.raises(ValueError, match="inject_target must be"):
        make_config(inject_target="yes")


def test_independent_seed_lds_and_resolved_injection_in_the_manifest(ray_session, tmp_path):
    """The held-out subsets are trained a second time, one model per task with its own seeds; both
    LDS are recorded, with the resolved injection (none: the prior is simulated MetaWorld)."""
    store, _ = make_synthetic_store(tmp_path)
    run_datamodel(store, "regression", TASK, "dm", make_config(RANKING))
    meta = store.manifest("datamodels/dm/tau").metadata
    assert meta["inject_target"] is False and meta["target_fraction"] == 0.0
    assert meta["lds"] > 0.3 and -1 <= meta["lds_independent_seeds"] <= 1
    assert meta["lds_independent_seeds"] != meta["lds"]
    held = RANKING["regression"]["heldout_models"]
    assert all(store.exists(batch_key("dm/independent", i)) for i in range(held))
    assert store.manifest("scores/dm").metadata["inject_target"] is False
    off = make_config(RANKING, regression={**RANKING["regression"], "lds_independent_seeds": False})
    assert run_datamodel(store, "regression", TASK, "dm-off", off).metadata["lds_independent_seeds"] is None


def test_reference_recipe_through_the_cli_ranks_and_records_the_pool(ray_session, tmp_path, capsys):
    store, good = make_synthetic_store(tmp_path)
    import yaml

    cfg_path = tmp_path / "dm.yaml"
    cfg_path.write_text(yaml.safe_dump({**SMALL, "metagrad": {"total_steps": 100, "meta_steps": 12, "iterations": 6}}))
    rc = main(["datamodel", "--estimator", "metagrad", "--store", str(tmp_path), "--target", TASK, "--run", "ref",
               "--config", str(cfg_path), "--metagrad-preset", "datamil", "--inject-target", "true"])
    assert rc == 0 and "target injected: True" in capsys.readouterr().out
    m = store.manifest("scores/ref")
    assert m.metadata["recipe"] == "datamil" and len(m.metadata["pool_sizes"][0]) == 6
    assert m.config["metagrad"]["lr_schedule"] == "linear" and m.config["metagrad"]["total_steps"] == 100
    per_episode = store.read_table("scores/ref").group_by("episode").aggregate([("score", "mean")]).sort_by("episode")
    assert spearmanr(per_episode.column("score_mean").to_numpy(), good).statistic > 0.5


def test_metagrad_presets():
    paper = make_config(metagrad_preset="datamil-paper")
    mg = paper.metagrad
    assert (mg.recipe, mg.total_steps, mg.meta_steps, mg.iterations) == ("datamil", 1100, 100, 50)
    assert (mg.lr, mg.warmup_steps, mg.batch_size, mg.chunk_rows, paper.hidden) == (5e-3, 44, 16364, 16364,
                                                                                  (400, 400, 400))
    small = make_config({"metagrad": {"iterations": 3}}, metagrad_preset="datamil")
    assert small.metagrad.recipe == "datamil" and small.metagrad.iterations == 3
    assert small.metagrad.total_steps == METAGRAD_PRESETS["datamil"]["metagrad"]["total_steps"]
    with pytest.raises(ValueError, match="metagrad_preset"):
        make_config(metagrad_preset="paper")
    with pytest.raises(ValueError, match="recipe must be one of"):
        make_config({"metagrad": {"recipe": "jax"}})
