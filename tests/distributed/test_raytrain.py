"""The Ray Train executor (:mod:`distcur.distributed.raytrain`): worker shares, fault injection,
and the check that a cluster holds the workers asked for (#17: a config asking for GPUs on a
cluster with none fails at once, naming the option and what the cluster has, instead of the
TorchTrainer waiting forever). The stage's runs on it are in tests/stages/test_datamodel.py."""

from __future__ import annotations

import time

import pytest
from datamodel_factory import SMALL, TASK, make_synthetic_store

from distcur.cli import main
from distcur.distributed.raytrain import (
    RayTrainSettings,
    check_cluster_resources,
    fire_fault_once,
    worker_share,
)
from distcur.stages.datamodel import make_config


def test_worker_share_gives_every_worker_the_same_slot_count():
    assert worker_share(list(range(5)), 0, 2) == ([0, 2, 4], 3)
    assert worker_share(list(range(5)), 1, 2) == ([1, 3], 3)
    assert worker_share([7], 1, 2) == ([], 1)


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




def test_gpus_on_a_cluster_without_any_fail_naming_the_option(ray_session, tmp_path, capsys):
    """The local Ray of the tests has no GPU: a ray-train datamodel asking for one per worker fails
    within its few seconds' wait (no autoscaler), through the CLI as one error line, naming
    ``ray_train.gpus_per_worker`` and the cluster's 0 GPUs; nothing is committed."""
    store, _ = make_synthetic_store(tmp_path)
    t0 = time.monotonic()
    rc = main(["datamodel", "--estimator", "regression", "--store", str(tmp_path), "--target", TASK, "--run", "gpu",
               "--executor", "ray-train", "--gpus-per-worker", "1", "--workers", "2",
               "--num-models", "4", "--heldout-models", "3", "--steps", "2", "--hidden", "8",
               "--no-lds-independent-seeds"])
    assert rc == 2 and time.monotonic() - t0 < 120
    err = capsys.readouterr().err
    assert "ray_train.gpus_per_worker = 1 x num_workers = 2 asks for 2 GPUs, but the Ray cluster has 0" in err
    assert "--gpus-per-worker 0" in err
    assert store.manifest("scores/gpu") is None and SMALL  # the same synthetic prior as the stage's tests


def test_resource_check_waits_for_nodes_an_autoscaler_adds(ray_session):
    """Within ``resource_wait_s`` the check polls the cluster's totals: GPUs that appear (an
    autoscaler's new node) let it pass; after the wait it fails, saying how long it waited."""
    seen = []

    def grows() -> dict:
        seen.append(time.monotonic())
        return {"CPU": 8.0, **({"GPU": 2.0} if len(seen) >= 3 else {})}

    settings = RayTrainSettings(num_workers=2, gpus_per_worker=1, resource_wait_s=30)
    check_cluster_resources(settings, poll_s=0.05, resources=grows)
    assert len(seen) == 3
    with pytest.raises(ValueError, match=r"asks for 2 GPUs, but the Ray cluster has 0 \(waited 0.2 s"):
        check_cluster_resources(RayTrainSettings(num_workers=2, gpus_per_worker=1, resource_wait_s=0.2), poll_s=0.05,
                                resources=lambda: {"CPU": 8.0})
    with pytest.raises(ValueError, match=r"cpus_per_worker = 4 x num_workers = 3 asks for 12 CPUs"):
        check_cluster_resources(RayTrainSettings(num_workers=3, cpus_per_worker=4), wait_s=0,
                                resources=lambda: {"CPU": 2.0})
    check_cluster_resources(RayTrainSettings(num_workers=2), wait_s=0)  # the real local Ray holds 2 CPU workers
    with pytest.raises(ValueError, match="resource_wait_s must be >= 0"):
        RayTrainSettings(resource_wait_s=-1)
