"""The ``ray-train`` executor: subset-model batches and meta-gradient iterations on one TorchTrainer.

Real local Ray, real TorchTrainers with 2 CPU workers; a worker is lost (``os._exit``) or raises
at a chosen item. Checked: the numbers equal the ``ray-tasks`` / driver path, every item is
committed exactly once across a restart (one ``_data-*`` version per item), and a rerun after a
failed run does only the missing items."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
from test_distributed import SMALL, TASK, make_synthetic_store  # the synthetic prior of the Ray-task tests

from distcur.cli import main
from distcur.commands.datamodel import make_config, run_datamodel
from distcur.datamodels.metagrad import MetagradRunConfig, round_pools, update_pool
from distcur.distributed.datamodels import batch_key
from distcur.distributed.metagrad import MetagradFailed, iteration_key
from distcur.distributed.raytrain import RayTrainSettings, fire_fault_once, worker_share
from distcur.store import Store

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
    manifest = run_datamodel(baseline, estimator, TASK, run, make_config(base))
    store, _ = make_synthetic_store(tmp_path / "train")
    marker = tmp_path / "fault"
    marker.write_text(fault)
    cfg = make_config(base, executor="ray-train", ray_train={"num_workers": 2, "max_failures": max_failures})
    return baseline, manifest, store, cfg, marker


def test_worker_share_gives_every_worker_the_same_slot_count():
    assert worker_share(list(range(5)), 0, 2) == ([0, 2, 4], 3)
    assert worker_share(list(range(5)), 1, 2) == ([1, 3], 3)
    assert worker_share([7], 1, 2) == ([], 1)


def test_round_pools_move_the_pool_once_per_round():
    """Round size 1 is the reference's sequence (each iteration sees every earlier move); with 2,
    both iterations of a round train on the pool the earlier rounds left, and the moves are the
    same ones applied in the same order."""
    cfg = MetagradRunConfig(total_steps=10, meta_steps=2, iterations=4, recipe="datamil")
    scores = [np.array([-3.0, 0.0, 1.0, 5.0, 2.0]), np.array([0.0, -2.0, 4.0, 1.0, -1.0]),
              np.array([1.0, 2.0, 0.0, -4.0, 3.0]), np.array([-1.0, 0.0, 2.0, 0.0, 1.0])]
    serial = [np.ones(5, bool)]
    for sc in scores:
        serial.append(update_pool(serial[-1], sc))
    pools1, sizes1 = round_pools(scores, 5, cfg, 1)
    pools2, sizes2 = round_pools(scores, 5, cfg, 2)
    for i in range(4):
        np.testing.assert_array_equal(pools1[i], serial[i])
    for i, j in ((0, 0), (1, 0), (2, 2), (3, 2)):
        np.testing.assert_array_equal(pools2[i], serial[j])
    assert sizes1 == sizes2 == [int(p.sum()) for p in serial[1:]]
    assert len(round_pools(scores[:1], 5, cfg, 2)[0]) == 2  # round 1's pool needs all of round 0
    with pytest.raises(ValueError, match="round_size"):
        round_pools(scores, 5, cfg, 0)


def test_fault_fires_once(tmp_path):
    marker = tmp_path / "m"
    marker.write_text("raise:3\n5")
    fire_fault_once(str(marker), 4)
    with pytest.raises(RuntimeError, match="injected failure at item 3"):
        fire_fault_once(str(marker), 3)
    fire_fault_once(str(marker), 3)  # struck off: passes now
    assert marker.read_text().split() == ["5"]
    with pytest.raises(ValueError, match="num_workers >= 1"):
        RayTrainSettings(num_workers=0)
    with pytest.raises(ValueError, match="executor must be one of"):
        make_config(executor="spark")


def test_ray_train_batches_survive_a_lost_worker_and_equal_ray_tasks(ray_session, tmp_path):
    """One TorchTrainer; batch 2's worker dies once; FailureConfig restarts the group, which skips
    the committed batches: every batch is trained once, and the results are the Ray-task path's."""
    tasks_store, _, store, cfg, marker = _baseline_and_ray_train_setup(tmp_path, "regression", "dm", REGRESSION, "2", 1)
    m = run_datamodel(store, "regression", TASK, "dm", cfg, fault_marker=str(marker))
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
    again = run_datamodel(store, "regression", TASK, "dm", make_config(REGRESSION))
    assert again.created == m.created


METAGRAD = {**SMALL, "metagrad": {"total_steps": 60, "meta_steps": 8, "iterations": 6}}


def test_metagrad_iterations_rerun_only_the_missing_ones_and_equal_the_driver_loop(ray_session, tmp_path):
    """distcur recipe: 6 independent iterations on 2 workers; with no restarts allowed, a worker
    lost at iteration 3 fails the stage with the others committed; the rerun does only the
    missing ones, and the scores equal the driver loop's."""
    driver_store, _, store, cfg, marker = _baseline_and_ray_train_setup(tmp_path, "metagrad", "mg", METAGRAD, "3", 0)
    with pytest.raises(MetagradFailed, match=r"of 6 iterations are not committed"):
        run_datamodel(store, "metagrad", TASK, "mg", cfg, fault_marker=str(marker))
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
    m = run_datamodel(store, "metagrad", TASK, "ref", cfg, fault_marker=str(marker))
    assert marker.read_text().split() == []
    # rounds of one: iterations 0 and 1 were committed before iteration 2 raised, and kept
    assert [len(_versions(store, iteration_key("ref", 0, i))) for i in range(2)] == [1, 1]
    assert m.metadata["pool_sizes"] == ref.metadata["pool_sizes"]
    np.testing.assert_allclose(_tau(store, "ref"), _tau(driver_store, "ref"), rtol=1e-4, atol=1e-7)
    assert os.path.isdir(store.path("datamodels/ref/ray"))
