"""The datamodel stage: subset models over Ray tasks (resume by completed-bitmap after a killed
worker), the ``distcur datamodel`` command end to end on a small synthetic prior, and the same
work on the ``ray-train`` executor (one TorchTrainer; a worker is lost (``os._exit``) or raises at a
chosen item). Checked for Ray Train: the numbers equal the ``ray-tasks`` / driver path, every item
is committed exactly once across a restart (one ``_data-*`` version per item), and a rerun after a
failed run does only the missing items."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import yaml
from datamodel_factory import DA, DS, LENGTH, SMALL, TASK, episodes, make_synthetic_store
from scipy.stats import spearmanr

from distcur.cli import main
from distcur.data import steps_key, target_source
from distcur.datamodels.subsets import SubsetTrainSettings
from distcur.policy.functional import AdamConfig, PolicySpec
from distcur.schema import SCORE_SCHEMA
from distcur.stages import datamodel
from distcur.stages.datamodel import (
    METAGRAD_PRESETS,
    BatchesFailed,
    MetagradFailed,
    _prepare,
    batch_key,
    completed_bitmap,
    iteration_key,
    make_config,
    resolve_inject_target,
)
from distcur.store import Store


def test_killed_worker_loses_only_its_batch_and_rerun_gives_same_tau(ray_session, tmp_path):
    store, _ = make_synthetic_store(tmp_path / "a")
    cfg = make_config(SMALL)
    marker = tmp_path / "kill"
    marker.write_text("2")
    with pytest.raises(BatchesFailed, match=r"1 of 4 batches failed \[2\]"):
        datamodel.run(store, replace(cfg, estimator="regression"), TASK, "dm", fault_marker=str(marker))
    committed = [store.manifest(batch_key("dm", i)) is not None for i in range(4)]
    assert committed == [True, True, False, True]
    assert store.manifest("scores/dm") is None
    first = {i: store.manifest(batch_key("dm", i)).created for i in (0, 1, 3)}

    marker.unlink()
    m = datamodel.run(store, replace(cfg, estimator="regression"), TASK, "dm")
    assert m.metadata["trained"] == 1 and m.metadata["skipped"] == 3
    assert {i: store.manifest(batch_key("dm", i)).created for i in (0, 1, 3)} == first
    tau = store.read_table("datamodels/dm/tau").column("tau").to_numpy()

    clean_store, _ = make_synthetic_store(tmp_path / "b")
    datamodel.run(clean_store, replace(cfg, estimator="regression"), TASK, "dm")
    np.testing.assert_allclose(tau, clean_store.read_table("datamodels/dm/tau").column("tau").to_numpy(),
                               rtol=1e-6, atol=1e-9)
    # The bitmap is full, and a third run is skipped as up to date.
    again = datamodel.run(store, replace(cfg, estimator="regression"), TASK, "dm")
    assert again.created == m.created


def test_bitmap_ignores_batches_made_with_another_config(ray_session, tmp_path):
    store, _ = make_synthetic_store(tmp_path)
    cfg = make_config(SMALL)
    datamodel.run(store, replace(cfg, estimator="regression"), TASK, "dm")
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
        m = datamodel.run(store, replace(cfg, estimator=estimator), TASK, f"cf-{estimator}")
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
    store.write_table(steps_key("sim-copy"), episodes("sim-copy", np.ones(2), rng), stage="ingest-metaworld")
    store.write_table(steps_key("robot"), episodes("robot", np.ones(2), rng), stage="ingest-rlds")
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
    datamodel.run(store, replace(make_config(RANKING), estimator="regression"), TASK, "dm")
    meta = store.manifest("datamodels/dm/tau").metadata
    assert meta["inject_target"] is False and meta["target_fraction"] == 0.0
    assert meta["lds"] > 0.3 and -1 <= meta["lds_independent_seeds"] <= 1
    assert meta["lds_independent_seeds"] != meta["lds"]
    held = RANKING["regression"]["heldout_models"]
    assert all(store.exists(batch_key("dm/independent", i)) for i in range(held))
    assert store.manifest("scores/dm").metadata["inject_target"] is False
    off = make_config(RANKING, regression={**RANKING["regression"], "lds_independent_seeds": False})
    assert datamodel.run(store, replace(off, estimator="regression"), TASK, "dm-off").metadata["lds_independent_seeds"] is None


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


# -- the ray-train executor -------------------------------------------------------------------

# No independent-seed LDS: one batch plan, the part that the executors share.
REGRESSION = {**SMALL, "regression": {**SMALL["regression"], "lds_independent_seeds": False}}


def _versions(store: Store, key: str) -> list[str]:
    return [n for n in store.listdir(key) if n.startswith("_data-")]


def _tau(store: Store, run: str) -> np.ndarray:
    return store.read_table(f"datamodels/{run}/tau").column("tau").to_numpy()


def _baseline_and_ray_train_setup(tmp_path, estimator: str, run: str, base: dict, fault: str, max_failures: int):
    """(a store with the run done by the default executor and its scores manifest, a fresh store,
    the ray-train config on 2 workers, the fault marker file holding ``fault``)."""
    baseline, _ = make_synthetic_store(tmp_path / "baseline")
    manifest = datamodel.run(baseline, replace(make_config(base), estimator=estimator), TASK, run)
    store, _ = make_synthetic_store(tmp_path / "train")
    marker = tmp_path / "fault"
    marker.write_text(fault)
    cfg = make_config(base, executor="ray-train", ray_train={"num_workers": 2, "max_failures": max_failures})
    return baseline, manifest, store, cfg, marker


def test_ray_train_batches_survive_a_lost_worker_and_equal_ray_tasks(ray_session, tmp_path):
    """One TorchTrainer; batch 2's worker dies once; FailureConfig restarts the group, which skips
    the committed batches: every batch is trained once, and the results are the Ray-task path's."""
    tasks_store, _, store, cfg, marker = _baseline_and_ray_train_setup(tmp_path, "regression", "dm", REGRESSION, "2", 1)
    m = datamodel.run(store, replace(cfg, estimator="regression"), TASK, "dm", fault_marker=str(marker))
    assert marker.read_text().split() == []  # the fault fired
    # (24 + 8) models / 8 per batch = 4 batches; rank 0 trains 0 and 2, rank 1 trains 1 and 3, and
    # both committed slot 0 (0, 1) before the report barrier that rank 0 passed on its way to 2.
    # Batches 0 and 1 were kept over the restart, 2 trained once after it (3 may have been cut
    # short by the restart: only a committed version counts).
    assert [len(_versions(store, batch_key("dm", i))) for i in range(3)] == [1, 1, 1]
    created = [store.manifest(batch_key("dm", i)).created for i in range(4)]
    assert max(created[:2]) < created[2]
    assert m.metadata["executor"] == "ray-train"
    a = tasks_store.read_table("datamodels/dm/results")
    b = store.read_table("datamodels/dm/results")
    assert a.column("model").to_pylist() == b.column("model").to_pylist()
    np.testing.assert_allclose(b.column("proxy").to_numpy(), a.column("proxy").to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(_tau(store, "dm"), _tau(tasks_store, "dm"), rtol=1e-5, atol=1e-9)
    # The executor is not part of what the stage computes: the other executor finds it up to date.
    again = datamodel.run(store, replace(make_config(REGRESSION), estimator="regression"), TASK, "dm")
    assert again.created == m.created


METAGRAD = {**SMALL, "metagrad": {"total_steps": 60, "meta_steps": 8, "iterations": 6}}


def test_metagrad_iterations_rerun_only_the_missing_ones_and_equal_the_driver_loop(ray_session, tmp_path):
    """distcur recipe: 6 independent iterations on 2 workers; with no restarts allowed, a worker
    lost at iteration 3 fails the stage with the others committed; the rerun does only the
    missing ones, and the scores equal the driver loop's."""
    driver_store, _, store, cfg, marker = _baseline_and_ray_train_setup(tmp_path, "metagrad", "mg", METAGRAD, "3", 0)
    with pytest.raises(MetagradFailed, match=r"of 6 iterations are not committed"):
        datamodel.run(store, replace(cfg, estimator="metagrad"), TASK, "mg", fault_marker=str(marker))
    first = {i: store.manifest(iteration_key("mg", 0, i)) for i in range(6)}
    committed = {i for i, man in first.items() if man is not None}
    assert 3 not in committed and 0 in committed and len(committed) < 6
    assert store.manifest("scores/mg") is None

    # the rerun through the CLI: --executor / --workers merged into the YAML's ray_train section
    cfg_path = tmp_path / "mg.yaml"
    cfg_path.write_text(yaml.safe_dump({**METAGRAD, "ray_train": {"max_failures": 0}}))
    assert main(["datamodel", "--estimator", "metagrad", "--store", str(store.root), "--target", TASK, "--run", "mg",
                 "--config", str(cfg_path), "--executor", "ray-train", "--workers", "2"]) == 0
    m = store.manifest("scores/mg")
    assert m.metadata["executor"] == "ray-train"
    for i in committed:  # kept, not recomputed
        assert len(_versions(store, iteration_key("mg", 0, i))) == 1, i
        assert store.manifest(iteration_key("mg", 0, i)).created == first[i].created
    assert all(store.manifest(iteration_key("mg", 0, i)) is not None for i in range(6))
    assert m.metadata["iterations"] == 6
    np.testing.assert_allclose(_tau(store, "mg"), _tau(driver_store, "mg"), rtol=1e-4, atol=1e-7)


def test_reference_recipe_rounds_of_one_equal_the_serial_sequence(ray_session, tmp_path):
    """datamil recipe, round_size 1 on 2 workers (each round one iteration; the pool moves after
    each): the same scores and pool sizes as the serial reference sequence on the driver; a
    worker that raises once is restarted by FailureConfig."""
    mg = {"recipe": "datamil", "total_steps": 60, "meta_steps": 8, "iterations": 4, "round_size": 1}
    base = {**SMALL, "metagrad": mg}
    driver_store, ref, store, cfg, marker = _baseline_and_ray_train_setup(tmp_path, "metagrad", "ref", base,
                                                                          "raise:2", 1)
    m = datamodel.run(store, replace(cfg, estimator="metagrad"), TASK, "ref", fault_marker=str(marker))
    assert marker.read_text().split() == []
    # rounds of one: iterations 0 and 1 were committed before iteration 2 raised, and kept
    assert [len(_versions(store, iteration_key("ref", 0, i))) for i in range(2)] == [1, 1]
    assert m.metadata["pool_sizes"] == ref.metadata["pool_sizes"]
    np.testing.assert_allclose(_tau(store, "ref"), _tau(driver_store, "ref"), rtol=1e-4, atol=1e-7)
    assert os.path.isdir(store.path("datamodels/ref/ray"))
