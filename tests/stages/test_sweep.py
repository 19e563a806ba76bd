"""``distcur sweep`` on Ray Tune: a real grid over scorer, top-x% and alpha with ASHA on the proxy."""

import functools

import pytest

from distcur.envs.generation import MetaWorldPriorConfig
from distcur.policy.train import TrainConfig
from distcur.sources.common import map_sequential
from distcur.stages.ingest import MetaWorldIngestConfig, run_metaworld
from distcur.stages.sweep import SweepConfig
from distcur.stages.sweep import run as run_sweep
from distcur.store import Store


@pytest.fixture(scope="module")
def prior_store(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("sweep-store")))
    cfg = MetaWorldPriorConfig(tasks=("reach-v3", "pick-place-v3"), success_per_task=2, failed_per_task=2,
                               failed_max_steps=30, max_steps=150, target_demos=3)
    run_metaworld(store, MetaWorldIngestConfig(prior=cfg, heldout_demos=2),
                  executor=functools.partial(map_sequential, progress=False), progress=False)
    return store


def test_grid_runs_every_point_and_commits_results(prior_store, ray_session, monkeypatch, capsys):
    monkeypatch.setenv("DISTCUR_PROGRESS", "1")  # as at a terminal: a bar over the trials
    cfg = SweepConfig(store=prior_store.uri, methods=("sr", "random"), top_percents=(25.0, 50.0), alphas=(0.5,),
                      report_every=10, grace_period=1, train=TrainConfig(steps=40, hidden=(16,), batch_size=32))
    table = run_sweep(cfg)
    bars = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if "sweep sweep trials" in ln]
    assert bars and all("/4 [" in ln for ln in bars) and any(f"| {n}/4 [" in ln for ln in bars for n in (1, 2, 3, 4))
    rows = table.to_pylist()
    assert sorted((r["method"], r["top_percent"]) for r in rows) == [
        ("random", 25.0), ("random", 50.0), ("sr", 25.0), ("sr", 50.0)]
    for r in rows:
        assert r["proxy_loss"] == r["proxy_loss"]  # finite, not NaN
        assert 10 <= r["steps_trained"] <= 40
    # ASHA (reduction factor 2) lets the best trial run to the end
    assert max(r["steps_trained"] for r in rows) == 40
    manifest = prior_store.manifest("sweeps/sweep")
    assert manifest.rows == 4 and manifest.metadata["metric"] == "proxy_loss"
    # a rerun with the same config and inputs is served from the store
    assert run_sweep(cfg).to_pylist() == rows


def test_bad_sweep_config():
    with pytest.raises(ValueError, match="unknown.*'dtw'"):
        SweepConfig(store="x", methods=("dtw",))
    with pytest.raises(ValueError, match="objective"):
        SweepConfig(store="x", objective="reward")
