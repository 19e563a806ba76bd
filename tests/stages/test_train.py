"""The train stage: training data from the store (a selection joined with the prior, named errors),
baselines, policies and checkpoints in the store and their resumption, the ``train`` / ``evaluate``
commands, and the loop under Ray Train's TorchTrainer (worker failure and resume, two workers, S3).

One Ray session for the Ray tests (each TorchTrainer start costs ~20 s on a shared 2-core machine).
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from policy_factory import ACTION_DIM, make_episodes, selection, toy_store_factory

from distcur.data import steps_key
from distcur.distributed.train import DataParallel
from distcur.policy.train import TrainConfig, train_policy
from distcur.schema import SELECTION_SCHEMA
from distcur.stages import train
from distcur.stages.train import (
    baseline_selection,
    latest_checkpoint,
    load_policy,
    load_policy_state,
    load_training_data,
    train_to_store,
)
from distcur.store import Store

torch.set_num_threads(1)

CFG = dict(hidden=(32, 32), batch_size=64, steps=30, checkpoint_every=10, log_every=5)


@pytest.fixture
def store_factory(tmp_path):
    return toy_store_factory(tmp_path)


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_session):
    """Ray started after the S3 variables are set, so its workers reach the loopback S3 server."""
    return ray_session


def build_store(uri: str) -> Store:
    store = Store(uri)
    store.write_table(steps_key("target-toy"), make_episodes("target-toy", 4, 20, 1), stage="test")
    store.write_table(steps_key("prior"), make_episodes("prior", 10, 20, 2), stage="test")
    store.write_table("selections/rand", baseline_selection(store, "random", fraction=0.5), stage="test")
    return store


def test_worker_killed_mid_training_resumes_from_last_checkpoint(ray_s3, tmp_path):
    store = build_store(str(tmp_path / "store"))
    marker, trace = tmp_path / "killed-once", tmp_path / "steps.txt"

    def die_once_at_25(step: int) -> None:
        with open(trace, "a") as f:
            f.write(f"{step}\n")
        if step == 25 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies without cleanup

    cfg = TrainConfig(**CFG)
    manifest = train.run(store, cfg, "target-toy", "rand", "ray1", executor=DataParallel(num_workers=1, max_failures=1),
                         on_step=die_once_at_25)
    steps = [int(x) for x in trace.read_text().split()]
    assert marker.exists()
    # Restarted from a reported checkpoint, not from scratch. Ray Train V2's controller registers a
    # report when it next polls the workers, so a worker that dies soon after reporting step 20 may
    # be restarted from step 10: either is a correct resume (the final params below prove it).
    restart = steps[25] - 1
    assert steps[:25] == list(range(1, 26)) and restart in (10, 20)
    assert steps[25:] == list(range(restart + 1, 31))
    state = torch.load(store.path("policies/ray1/policy.pt"), weights_only=True)
    data = load_training_data(store, "target-toy", store.read_table("selections/rand"))
    params, _, history = train_policy(data, cfg)
    for k in params:
        torch.testing.assert_close(state["params"][k], params[k], rtol=0, atol=0)
    assert state["meta"]["history"] == history and manifest.inputs == data.inputs
    assert sorted(os.listdir(tmp_path / "store" / "policies" / "ray1" / "ray" / "train"))  # Ray Train's storage


@pytest.mark.slow
def test_two_workers_on_s3_match_one_process(ray_s3, s3_bucket):
    store = build_store(f"{s3_bucket}/store")
    cfg = TrainConfig(**CFG)
    train.run(store, cfg, "target-toy", "rand", "ray2",
              executor=DataParallel(num_workers=2, max_failures=0, storage_path=f"{s3_bucket}/ray-storage"))
    state = load_policy_state(store, "ray2")
    data = load_training_data(store, "target-toy", store.read_table("selections/rand"))
    params, _, history = train_policy(data, cfg)
    for k in params:
        torch.testing.assert_close(state["params"][k], params[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([h["loss"] for h in state["meta"]["history"]], [h["loss"] for h in history], rtol=1e-4)
    assert store.fs.get_file_info(f"{s3_bucket[5:]}/ray-storage/train").type.name == "Directory"


# -- data assembly and selection validation --------------------------------------------------


def test_load_training_data_joins_selection(store_factory):
    store = store_factory()
    sel = selection([(3, 5, 2.0), (0, 0, 1.0), (9, 19, 0.5)])
    data = load_training_data(store, "target-toy", sel)
    assert data.n_target == 80 and data.n_prior == 3
    np.testing.assert_allclose(data.prior_weight, [2.0, 1.0, 0.5])
    prior = store.read_table(steps_key("prior")).to_pandas()
    row = prior[(prior.episode == 9) & (prior.step == 19)].iloc[0]
    np.testing.assert_allclose(data.obs[80 + 2], row.state)
    np.testing.assert_allclose(data.act[80 + 2], row.action)
    assert set(data.inputs) == {"target", "selection", "prior:prior"}


@pytest.mark.parametrize(
    "rows, match",
    [
        ([(1, 0, 1.0), (42, 3, 1.0)], r"unknown \(source, episode, step\).*episode=42, step=3"),
        ([(1, 0, 1.0), (1, 20, 1.0)], r"unknown.*episode=1, step=20"),
        ([("nope", 1, 0, 1.0)], r"source 'nope'.*no committed step table"),
        ([(1, 0, 1.0), (1, 1, -0.5)], r"negative weights.*episode=1, step=1"),
        ([(1, 0, float("nan")), (1, 1, 1.0)], r"non-finite weights.*episode=1, step=0"),
        ([(1, 0, 1.0), (1, 0, 2.0)], r"duplicate rows.*episode=1, step=0"),
        ([], r"selection is empty"),
        ([(1, 0, 0.0)], r"only zero weights"),
    ],
)
def test_bad_selection_tables_raise_clear_errors(store_factory, rows, match):
    store = store_factory()
    with pytest.raises(ValueError, match=match):
        load_training_data(store, "target-toy", selection(rows))


def test_selection_missing_column_and_empty_allowed(store_factory):
    store = store_factory()
    with pytest.raises(ValueError, match=r"missing columns \['weight'\]"):
        load_training_data(store, "target-toy", pa.table({"source": ["prior"], "episode": [0], "step": [0]}))
    data = load_training_data(store, "target-toy", SELECTION_SCHEMA.empty_table(), allow_empty_selection=True)
    assert data.n_prior == 0 and data.n_target == 80
    with pytest.raises(FileNotFoundError, match="target-missing"):
        load_training_data(store, "target-missing", None)


def test_baseline_selections(store_factory):
    store = store_factory()
    assert baseline_selection(store, "target_only").num_rows == 0
    everything = baseline_selection(store, "all")
    assert everything.num_rows == 200 and everything.schema == SELECTION_SCHEMA
    assert set(everything.column("source").to_pylist()) == {"prior"}  # target-* sources excluded
    half = baseline_selection(store, "random", fraction=0.3, seed=5)
    assert len(set(half.column("episode").to_pylist())) == 3 and half.num_rows == 60
    assert half.equals(baseline_selection(store, "random", fraction=0.3, seed=5))
    with pytest.raises(ValueError, match="fraction"):
        baseline_selection(store, "random", fraction=0.0)


def test_train_to_store_checkpoints_load_weights_only_and_resume(store_factory):
    store = store_factory()
    data = load_training_data(store, "target-toy", baseline_selection(store, "random", fraction=0.5))
    cfg = TrainConfig(**CFG)

    class Crash(Exception):
        pass

    def crash_at_25(step):
        if step == 25:
            raise Crash

    with pytest.raises(Crash):
        train_to_store(store, "run1", data, cfg, on_step=crash_at_25)
    latest = latest_checkpoint(store, "run1")
    assert latest["step"] == 20 and set(latest["adam"]) == {"m", "v", "t"}
    manifest = train_to_store(store, "run1", data, cfg)  # resumes at 20
    state = torch.load(store.path("policies/run1/policy.pt"), weights_only=True)
    assert state["step"] == 30 and "adam" not in state and manifest.files == ["policies/run1/policy.pt"]
    p_ref, n_ref, _ = train_policy(data, cfg)
    for k in p_ref:
        assert torch.equal(state["params"][k], p_ref[k])
    assert store.is_done("policies/run1", "train", manifest.config, data.inputs)
    train_to_store(store, "run1", data, cfg, on_step=crash_at_25)  # up to date: skipped, no crash

    policy = pickle.loads(pickle.dumps(load_policy(store, "run1")))
    obs = data.obs[:7]
    act = policy(obs)
    assert act.shape == (7, ACTION_DIM) and np.all(np.abs(act) <= 1)
    assert policy(obs[0]).shape == (ACTION_DIM,)
    with pytest.raises(FileNotFoundError, match="no policy checkpoint"):
        load_policy(store, "missing-run")


def test_cli_train_and_evaluate_proxy_only(store_factory, tmp_path):
    from distcur.cli import main

    store = store_factory()
    cfg_yaml = tmp_path / "train.yaml"
    cfg_yaml.write_text("hidden: [16, 16]\nbatch_size: 32\ncheckpoint_every: 5\nlog_every: 5\n")
    common = ["--store", store.uri, "--target", "target-toy", "--config", str(cfg_yaml), "--steps", "10"]
    assert main(["train", *common, "--selection", "random:0.5:3", "--out", "rand50"]) == 0
    assert main(["train", *common, "--selection", "none", "--out", "tonly"]) == 0
    state = load_policy_state(store, "rand50")
    assert state["meta"]["data"]["n_prior"] == 100 and state["meta"]["config"]["hidden"] == [16, 16]
    assert load_policy_state(store, "tonly")["meta"]["data"]["n_prior"] == 0
    assert main(["train", *common, "--selection", "missing-run", "--out", "x"]) == 2  # clear error, exit 2
    assert main(["evaluate", "rand50", "--task", "toy", "--store", store.uri, "--episodes", "0",
                 "--proxy-source", "target-toy", "--seeds", "0", "1", "--method", "random50"]) == 0
    table = store.read_table("evals/rand50").to_pylist()
    assert [r["seed"] for r in table] == [0, 1] and table[0]["method"] == "random50"
    assert math.isnan(table[0]["success"]) and np.isfinite(table[0]["proxy_loss"])
