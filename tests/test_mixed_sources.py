"""Sources a user brings (here: two Parquet step tables ingested with ``distcur ingest parquet``, with
camera images): the datamodel and rebalance stages read only the columns they use (never ``image``);
sources with different action spaces are standardised per source in training and mapped back at
evaluation; a task with no simulator is evaluated by the proxy only, and says so."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ingest_calls import ingest_parquet

from distcur.cli import main as cli_main
from distcur.data import eval_key, source_metadata_of, steps_key, target_source
from distcur.policy.actions import ActionStandardizer, choose_mode, statistics_differ
from distcur.policy.train import TrainConfig
from distcur.rebalance.dro import DROConfig
from distcur.stages import datamodel, rebalance
from distcur.stages.datamodel import make_config
from distcur.stages.rebalance import RebalanceConfig
from distcur.stages.train import baseline_selection, load_policy, load_training_data, train_to_store
from distcur.store import Store

TASK = "synth-reach"
DS, DA, LENGTH = 6, 2, 20
MAP = ["state=obs", "action=act", "episode=ep", "step=t", "task=instruction", "image=img"]
W = np.random.default_rng(7).normal(size=(DA, DS)) / np.sqrt(DS)


def write_source(path, episodes: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> None:
    """Episodes of one behaviour a = tanh(2 W s) in units ``scale * a + offset``, with a PNG per step."""
    from distcur.sources.common import encode_image

    rng = np.random.default_rng(seed)
    n = episodes * LENGTH
    obs = rng.normal(size=(n, DS)).astype(np.float32)
    act = (scale * np.tanh(2 * obs @ W.T) + offset).astype(np.float32)
    frame = encode_image(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "png")
    pq.write_table(pa.table({
        "ep": np.repeat(np.arange(episodes), LENGTH), "t": np.tile(np.arange(LENGTH), episodes),
        "obs": pa.FixedSizeListArray.from_arrays(pa.array(obs.ravel()), DS),
        "act": pa.FixedSizeListArray.from_arrays(pa.array(act.ravel()), DA),
        "instruction": [f"task {e % 2}" for e in np.repeat(np.arange(episodes), LENGTH)],
        "img": pa.array([frame] * n, pa.binary()),
    }), path)


class RecordingStore(Store):
    """The real store, noting the columns of every table read (workers get a plain Store)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[str, list[str] | None]] = []

    def read_table(self, key, columns=None, filters=None):
        self.reads.append((key, columns))
        return super().read_table(key, columns=columns, filters=filters)

    def iter_batches(self, key, columns=None, batch_size=65536):
        self.reads.append((key, columns))
        return super().iter_batches(key, columns=columns, batch_size=batch_size)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(same-units store, mixed-units store): a prior and the target ingested from Parquet files; in
    the mixed one the prior's actions are in other units (x100 + 50, a robot logging centimetres)."""
    root = tmp_path_factory.mktemp("mixed")
    out = []
    for name, scale, offset in (("same", 1.0, 0.0), ("mixed", 100.0, 50.0)):
        write_source(root / f"{name}-prior.parquet", 12, seed=1, scale=scale, offset=offset)
        write_source(root / f"{name}-target.parquet", 4, seed=2)
        store = Store(root / f"store-{name}")
        ingest_parquet(str(root / f"{name}-prior.parquet"), store, "robot", MAP, progress=False)
        ingest_parquet(str(root / f"{name}-target.parquet"), store, target_source(TASK), MAP, progress=False)
        out.append(store)
    return out


def test_datamodel_and_rebalance_never_read_images(ray_session, stores):
    store = RecordingStore(stores[0].uri)
    assert store.read_table(steps_key("robot"), columns=["image"]).column("image").null_count == 0
    store.reads.clear()
    cfg = make_config({"hidden": [16], "batch_size": 32,
                       "regression": {"num_models": 8, "heldout_models": 4, "steps": 10, "models_per_batch": 8,
                                      "cv_folds": 3, "lds_independent_seeds": False}})
    m = datamodel.run(store, replace(cfg, estimator="regression"), TASK, "dm")
    assert m.config["prior_sources"] == ["robot"]  # the store's non-target sources
    rebalance.run(store, RebalanceConfig(method="dro", groups="task", hidden=(16,),
                                         dro=DROConfig(steps=5, reference_steps=5, batch_size=32)), "balanced")
    step_reads = [(k, c) for k, c in store.reads if k.startswith("steps/")]
    assert {k for k, _ in step_reads} == {steps_key("robot"), steps_key(target_source(TASK))}
    for key, columns in step_reads:
        assert columns is not None and "image" not in columns, (key, columns)


def test_prior_sources_come_from_the_store_or_the_cli(ray_session, stores, tmp_path, capsys):
    store = stores[0]
    args = ["datamodel", "--store", store.uri, "--target", TASK, "--run", "dm-cli", "--prior-sources", "nosuch"]
    assert cli_main(args) == 2
    assert "steps/source=nosuch" in capsys.readouterr().err


def test_action_standardizer_round_trips_and_detects_other_units():
    stats = {"a": {"action_mean": [0.0, 1.0], "action_std": [1.0, 2.0]},
             "b": {"action_mean": [50.0, 60.0], "action_std": [100.0, 100.0]}}
    s = ActionStandardizer.from_dict(ActionStandardizer.from_stats(stats, "a").to_dict())
    a = np.array([[1.0, 3.0], [150.0, 160.0]])
    z = s.apply(a, np.array(["a", "b"]))
    np.testing.assert_allclose(z, [[1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(s.undo(s.to_output(a[:1])), a[:1], rtol=1e-6)
    assert statistics_differ(stats)
    near = {"a": stats["a"], "c": {"action_mean": [0.2, 1.5], "action_std": [1.5, 1.0]}}
    assert not statistics_differ(near)
    # a gripper held closed in one source is not another action space; nor are two sources in [-1, 1]
    held = {"a": stats["a"], "g": {"action_mean": [0.1, 1.0], "action_std": [0.9, 0.0]}}
    assert not statistics_differ(held)
    unit = {s: {"action_mean": m, "action_std": d, "action_min": [-1.0, -1.0], "action_max": [1.0, 1.0]}
            for s, m, d in (("u", [0.0, 0.0], [0.5, 0.5]), ("v", [0.0, 0.9], [0.01, 0.01]))}
    assert not statistics_differ(unit)
    assert statistics_differ({**unit, "v": {**unit["v"], "action_max": [1.0, 5.0]}})
    assert choose_mode("auto", {"a": ("x",), "c": ("x",)}, near) == "global"
    assert choose_mode("auto", {"a": ("x",), "c": ("y",)}, near) == "per-source"
    assert choose_mode("global", {"a": ("x",), "b": ("x",)}, stats) == "global"
    with pytest.raises(ValueError, match="no statistics for source 'z'"):
        s.apply(a, np.array(["a", "z"]))
    with pytest.raises(ValueError, match="action_normalization must be one of"):
        choose_mode("per-robot", {}, stats)


def test_mixed_action_spaces_are_standardised_per_source_and_undone_at_evaluation(stores):
    same, mixed = stores
    target = target_source(TASK)
    # same units: nothing changes (auto keeps one normalisation)
    data = load_training_data(same, target, baseline_selection(same, "all"))
    assert data.action_norm is None and "action_normalization" not in data.inputs
    # other units: each source by its own manifest statistics, the policy acting in the target's space
    data = load_training_data(mixed, target, baseline_selection(mixed, "all"))
    assert data.action_norm["output"] == target and data.inputs["action_normalization"] == "per-source"
    prior_meta = source_metadata_of(mixed, "robot")
    assert data.action_norm["sources"]["robot"]["action_mean"] == pytest.approx(prior_meta["action_mean"])
    prior_rows = data.act[data.n_target:]
    np.testing.assert_allclose(prior_rows.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(prior_rows.std(0), 1, atol=1e-3)

    cfg = dict(hidden=(32, 32), steps=300, batch_size=64, checkpoint_every=0, log_every=50, action_bounds=None)
    errors = {}
    t = mixed.read_table(steps_key(target), columns=["state", "action"])
    states = np.array(t.column("state").to_pylist(), np.float32)
    actions = np.array(t.column("action").to_pylist(), np.float32)
    for mode in ("per-source", "global"):
        tc = TrainConfig(**cfg, action_normalization=mode)
        d = load_training_data(mixed, target, baseline_selection(mixed, "all"), action_normalization=mode)
        train_to_store(mixed, f"pol-{mode}", d, tc)
        policy = load_policy(mixed, f"pol-{mode}")
        assert (policy.action_norm is not None) == (mode == "per-source")
        errors[mode] = float(np.abs(policy(states) - actions).mean())
    # mapped back to the target's units (the target's actions are in [-1, 1], the prior's in [-50, 150]),
    # and better on the target than one normalisation over both units
    assert errors["per-source"] < 0.3 < errors["global"], errors


def test_no_simulator_means_proxy_only_said_in_output_and_report(stores, capsys, tmp_path):
    from distcur.stages.report import build_report

    store = stores[1]
    target = target_source(TASK)
    data = load_training_data(store, target, None, allow_empty_selection=True)
    train_to_store(store, "pol-target", data, TrainConfig(hidden=(16,), steps=20, batch_size=32, checkpoint_every=0,
                                                          log_every=10, action_bounds=None))
    capsys.readouterr()
    assert cli_main(["evaluate", "pol-target", "--task", TASK, "--store", store.uri, "--episodes", "5",
                     "--seeds", "0", "1", "--in-sample-proxy", "--no-ray"]) == 0
    out = capsys.readouterr().out
    assert (f"evaluate pol-target: PROXY-ONLY evaluation, no simulator for task {TASK!r} (not a MetaWorld v3 task"
            in out)
    rows = store.read_table(eval_key("pol-target")).to_pylist()
    assert [r["evaluation"] for r in rows] == ["proxy-only"] * 2 and all(np.isnan(r["success"]) for r in rows)
    assert all(r["episodes"] == 0 and np.isfinite(r["proxy_loss"]) for r in rows)
    assert json.loads(out[out.index("{"):])["records"][0]["evaluation"] == "proxy-only"
    assert "Proxy-only evaluation</b>" in build_report(store, "pol-target")
    # a mistyped MetaWorld task is not silently proxy-only: the rollouts name the valid tasks
    assert cli_main(["evaluate", "pol-target", "--task", "pick-place-wal-v3", "--store", store.uri, "--episodes",
                     "1", "--seeds", "0", "--proxy-source", target, "--no-ray"]) == 2
    assert "unknown MetaWorld task 'pick-place-wal-v3'; valid names:" in capsys.readouterr().err
