"""The ingest stage on MetaWorld: prior/target generation counts, determinism on any executor, the
target rule, replayable success, resume; and ``distcur ingest``'s flags built from the stage configs."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow.compute as pc
import pytest

from distcur.data import StepArrays, steps_key, target_source
from distcur.envs.generation import EpisodeSpec, MetaWorldPriorConfig
from distcur.envs.metaworld import make_envs, reset_env
from distcur.sources.common import map_sequential
from distcur.sources.metaworld import PRIOR_SOURCE, generate_chunk
from distcur.stages.ingest import MetaWorldIngestConfig, run_metaworld
from distcur.store import Store

LOCAL = functools.partial(map_sequential, progress=False)  # the jobs in this process, no Ray


def generate_metaworld(cfg: MetaWorldPriorConfig, store: Store, executor=None, **kw) -> dict:
    """The stage on ``cfg`` without held-out demos (Ray tasks unless an executor is given)."""
    return run_metaworld(store, MetaWorldIngestConfig(prior=cfg, heldout_demos=0), executor, **kw)


TARGET = "button-press-topdown-v3"
TASKS = ("reach-v3", "drawer-close-v3", TARGET)


def small_config(**kw) -> MetaWorldPriorConfig:
    base = dict(target=TARGET, tasks=TASKS, success_per_task=2, failed_per_task=3, target_demos=2,
                failed_max_steps=60, max_steps=200, chunk_episodes=3)
    return MetaWorldPriorConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def generated(ray_session, tmp_path_factory):
    """The same config generated twice: through Ray, and in one process."""
    cfg = small_config()
    ray_store = Store(tmp_path_factory.mktemp("mw_ray"))
    local_store = Store(tmp_path_factory.mktemp("mw_local"))
    info = generate_metaworld(cfg, ray_store, progress=False)
    generate_metaworld(cfg, local_store, LOCAL)
    return cfg, ray_store, local_store, info


def test_counts_and_target_rule(generated):
    cfg, store, _, info = generated
    prior = StepArrays.from_table(store.read_table(steps_key(PRIOR_SOURCE)))
    target = StepArrays.from_table(store.read_table(steps_key(target_source(TARGET))))
    assert prior.state.shape[1] == 39 and prior.action.shape[1] == 4
    assert np.all(np.abs(prior.action) <= 1.0)
    episodes = {}
    for task, ok in zip(prior.task[prior.is_first], prior.success[prior.is_first]):
        episodes.setdefault(task, []).append(bool(ok))
    # 2 successes + 3 failures per task, except the target: failures only
    assert {t: (sum(v), len(v) - sum(v)) for t, v in episodes.items()} == {
        "reach-v3": (2, 3), "drawer-close-v3": (2, 3), TARGET: (0, 3)}
    assert not prior.success[prior.task == TARGET].any()
    assert info["prior"]["episodes"] == 13 and info["target"]["episodes"] == 2
    assert set(target.task) == {TARGET} and target.success.all() and target.is_last.sum() == 2
    assert info["prior"]["rows"] == len(prior) and info["target"]["rows"] == len(target)
    # success is an episode outcome: constant within an episode
    ids = prior.episode_ids()
    assert all(len(set(prior.success[ids == i])) == 1 for i in np.unique(ids))
    m = store.manifest(steps_key(PRIOR_SOURCE))
    assert m.metadata["sources"][PRIOR_SOURCE]["state_dim"] == 39
    tasks = m.metadata["tasks"]
    assert tasks["reach-v3"]["expert_success_rate"] > 0.5 and tasks[TARGET]["expert_success_rate"] is None
    assert sum(tasks[TARGET]["failed_modes"].values()) == 3
    assert store.manifest(steps_key(target_source(TARGET))).metadata["tasks"][TARGET]["expert_success_rate"] > 0.5


def test_ray_and_local_runs_are_equal(generated):
    """Deterministic for a seed, whatever runs the episodes."""
    _, ray_store, local_store, _ = generated
    for key in (steps_key(PRIOR_SOURCE), steps_key(target_source(TARGET))):
        a, b = ray_store.read_table(key), local_store.read_table(key)
        assert a.equals(b), key
        assert ray_store.manifest(key).metadata["episode_seeds"] == local_store.manifest(key).metadata["episode_seeds"]


def _replay(task: str, seed: int, actions: np.ndarray, states: np.ndarray) -> list[bool]:
    env = make_envs(task, 1)[0]
    obs = reset_env(env, seed)
    flags = []
    for s, a in zip(states, actions):
        np.testing.assert_allclose(obs, s, atol=1e-5)
        obs, _, _, _, info = env.step(a)
        flags.append(bool(info["success"]))
    return flags


def test_recorded_success_replays(generated):
    """Replaying a stored episode from its recorded seed reproduces its states and its outcome."""
    _, store, _, _ = generated
    key = steps_key(target_source(TARGET))
    target = StepArrays.from_table(store.read_table(key))
    seeds = store.manifest(key).metadata["episode_seeds"]
    rows = target.episode == 0
    flags = _replay(TARGET, seeds[0], target.action[rows], target.state[rows])
    assert flags[-1] and not any(flags[:-1])  # stops at the first success

    prior_key = steps_key(PRIOR_SOURCE)
    table = store.read_table(prior_key, filters=pc.field("task") == TARGET)
    prior = StepArrays.from_table(table)
    ep = int(prior.episode[0])
    rows = prior.episode == ep
    flags = _replay(TARGET, store.manifest(prior_key).metadata["episode_seeds"][ep], prior.action[rows], prior.state[rows])
    assert not any(flags)


def test_seed_changes_the_data():
    cfg0, cfg1 = small_config(), small_config(seed=1)
    spec = EpisodeSpec(PRIOR_SOURCE, 0, "reach-v3", "success", 0)
    t0, _ = generate_chunk(cfg0, [spec])
    t0b, _ = generate_chunk(cfg0, [spec])
    t1, _ = generate_chunk(cfg1, [spec])
    assert t0.equals(t0b)
    assert not t0.column("state").equals(t1.column("state"))


def test_resume_skips(generated):
    cfg, store, _, _ = generated
    before = {k: store.manifest(k).created for k in (steps_key(PRIOR_SOURCE), steps_key(target_source(TARGET)))}
    info = generate_metaworld(cfg, store, lambda *a, **k: pytest.fail("resume should not generate"))
    assert info["prior"]["skipped"] and info["target"]["skipped"] and info["prior"]["episodes"] == 13
    assert {k: store.manifest(k).created for k in before} == before


def test_onehot_and_task_counts(tmp_path):
    cfg = MetaWorldPriorConfig(target="reach-v3", tasks=("drawer-close-v3", "reach-v3"), success_per_task=1,
                               failed_per_task=1, target_demos=1, failed_max_steps=20, max_steps=150,
                               task_counts={"drawer-close-v3": 2}, append_task_onehot=True)
    store = Store(tmp_path)
    info = generate_metaworld(cfg, store, LOCAL)
    prior = StepArrays.from_table(store.read_table(steps_key(PRIOR_SOURCE)))
    target = StepArrays.from_table(store.read_table(steps_key(target_source("reach-v3"))))
    assert prior.state.shape[1] == target.state.shape[1] == 41 == cfg.state_dim
    assert info["prior"]["tasks"]["drawer-close-v3"]["success_episodes"] == 2
    np.testing.assert_array_equal(prior.state[prior.task == "drawer-close-v3", 39:], [[1, 0]] * int((prior.task == "drawer-close-v3").sum()))
    np.testing.assert_array_equal(target.state[:, 39:], [[0, 1]] * len(target))
    assert store.manifest(steps_key(PRIOR_SOURCE)).metadata["onehot_over"] == ["drawer-close-v3", "reach-v3"]


def test_datamil_prior_holds_the_targets_demos_and_long_failures(tmp_path):
    """The DataMIL-like prior: the target task's own successful demos are in the prior (the hard prior
    has none, test_counts_and_target_rule), every failure ran 200 steps without success, and the
    manifest records each episode's kind."""
    cfg = MetaWorldPriorConfig.datamil(TARGET, per_task=2, tasks=TASKS, target_demos=2, chunk_episodes=4)
    assert cfg.kind == "datamil" and cfg.success_noise == pytest.approx(0.2) and cfg.successes(TARGET) == 2
    store = Store(tmp_path)
    generate_metaworld(cfg, store, LOCAL)
    prior = StepArrays.from_table(store.read_table(steps_key(PRIOR_SOURCE)))
    first = prior.is_first
    outcome = {(t, bool(ok)) for t, ok in zip(prior.task[first], prior.success[first])}
    assert (TARGET, True) in outcome and (TARGET, False) in outcome
    lengths = np.bincount(prior.episode)
    ok = prior.success[first]
    assert (lengths[prior.episode[first][~ok]] == 200).all()  # failures kept only at 200 steps
    assert (lengths[prior.episode[first][ok]] < 200).all()  # demos end at their first success
    modes = store.manifest(steps_key(PRIOR_SOURCE)).metadata["episode_modes"]
    assert len(modes) == len(lengths) and set(modes) == {"success", "noisy", "other_expert"}
    assert [m == "success" for m in modes] == ok[np.argsort(prior.episode[first])].tolist()
    # the target set stays apart from the prior's demos of the same task
    target = StepArrays.from_table(store.read_table(steps_key(target_source(TARGET))))
    starts = {tuple(x) for x in prior.state[first].round(5).tolist()}
    assert target.success.all() and not starts & {tuple(x) for x in target.state[target.is_first].round(5).tolist()}


# -- the CLI is built from the stage configs ----------------------------------------------------


def test_file_source_flags_come_from_the_stage_config_and_a_yaml_config(tmp_path, capsys):
    """``ingest parquet --config`` reads the ParquetIngestConfig fields from YAML, the flags win, and
    a bad value is one error line naming the field."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from distcur.cli import main

    rows = [{"ep": e, "obs": [float(e), float(t)], "act": [0.5 * t], "t": t} for e in range(3) for t in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "steps.parquet")
    conf = tmp_path / "parquet.yaml"
    conf.write_text(yaml.safe_dump({"source": "mine", "map": ["state=obs", "action=act", "episode=ep", "step=t"],
                                    "rows_per_part": 5}))
    out = tmp_path / "store"
    assert main(["ingest", "parquet", str(tmp_path / "steps.parquet"), "--config", str(conf), "--out", str(out),
                 "--no-ray", "--rows-per-part", "8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == 12 and printed["episodes"] == 3 and printed["state_dim"] == 2
    m = Store(out).manifest(steps_key("mine"))
    assert m.config["rows_per_part"] == 8 and m.config["map"]["state"] == ["obs"]  # the flag won over the YAML
    conf.write_text(yaml.safe_dump({"source": "mine", "map": ["state=obs", "action=act", "episode=ep"],
                                    "rows_per_part": "many"}))
    assert main(["ingest", "parquet", str(tmp_path / "steps.parquet"), "--config", str(conf), "--out", str(out),
                 "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert f"{conf}: rows_per_part = 'many' is a str, but ParquetIngestConfig.rows_per_part expects int" in err


def test_metaworld_flags_are_the_prior_config_fields(ray_session, tmp_path, capsys):
    """``ingest metaworld`` takes every MetaWorldPriorConfig field as a flag (``--success-per-task``, ...)
    over its YAML, and ``--heldout-demos`` from the stage config; the run is the stage's."""
    import json

    import yaml

    from distcur.cli import main

    conf = tmp_path / "mw.yaml"
    conf.write_text(yaml.safe_dump({"tasks": ["reach-v3"], "success_per_task": 3, "failed_per_task": 1,
                                    "failed_max_steps": 10, "max_steps": 150, "target_demos": 1}))
    out = tmp_path / "store"
    assert main(["ingest", "metaworld", "--target", "reach-v3", "--config", str(conf), "--success-per-task", "1",
                 "--out", str(out), "--heldout-demos", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prior"]["episodes"] == 1 and info["target"]["episodes"] == 1  # hard prior: the target's failure
    assert info["heldout"]["rows"] > 0 and info["heldout"]["key"].endswith("target-reach-v3-heldout")
    m = Store(out).manifest(steps_key(PRIOR_SOURCE))
    assert m.config["success_per_task"] == 1 and m.config["tasks"] == ["reach-v3"]
    assert main(["ingest", "metaworld", "--target", "reach-v3", "--out", str(out), "--heldout-demos", "-1"]) == 2
    assert "--heldout-demos must be >= 0, got -1" in capsys.readouterr().err
