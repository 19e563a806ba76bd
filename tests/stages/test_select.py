"""Selection: top x% / threshold at step, sub-trajectory and episode level; the stage: LeRobot export, a
selection's make-up, CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from distcur.data import scores_key, selection_key, steps_key
from distcur.schema import SCORE_SCHEMA, SELECTION_SCHEMA, steps_table
from distcur.select import SelectConfig, cluster_scores, select_steps
from distcur.stages.select import lerobot_key, selection_composition
from distcur.stages.select import select as run_select
from distcur.store import Store


def score_table(source, episode, step, score, method="br") -> pa.Table:
    return pa.Table.from_arrays([pa.array(source, pa.string()), pa.array(episode, pa.int64()),
                                 pa.array(step, pa.int32()), pa.array(score, pa.float64()),
                                 pa.array([method] * len(score), pa.string())], schema=SCORE_SCHEMA)


def keys(sel: pa.Table) -> list[tuple]:
    return list(zip(sel.column("source").to_pylist(), sel.column("episode").to_pylist(), sel.column("step").to_pylist()))


def test_step_level_top_percent_and_threshold():
    n = 200
    rng = np.random.default_rng(0)
    score = rng.permutation(n) / n
    t = score_table(["a"] * n, np.repeat(np.arange(4), 50), np.tile(np.arange(50), 4), score)
    sel = select_steps(t, SelectConfig(top_percent=10))
    assert sel.schema.equals(SELECTION_SCHEMA, check_metadata=False)
    assert sel.num_rows == 20 and set(keys(sel)) == set(
        (s, e, st) for s, e, st, v in zip(["a"] * n, np.repeat(np.arange(4), 50), np.tile(np.arange(50), 4), score)
        if v >= 0.9)
    assert keys(sel) == sorted(keys(sel)) and set(sel.column("weight").to_pylist()) == {1.0}
    assert select_steps(t, SelectConfig(top_percent=0.1)).num_rows == 1  # at least one
    assert select_steps(t, SelectConfig(top_percent=100)).num_rows == n
    thr = select_steps(t, SelectConfig(top_percent=None, threshold=0.5))
    assert thr.num_rows == int((score >= 0.5).sum()) == 100
    assert select_steps(t, SelectConfig(top_percent=None, threshold=2.0)).num_rows == 0
    w = select_steps(t, SelectConfig(top_percent=5, weighting="score"))
    assert min(w.column("weight").to_pylist()) >= 0.95 - 1e-6


def test_subtraj_and_episode_levels_keep_whole_clusters():
    # two sources, 3 episodes of 10 steps each; scores rise with episode, one hot window
    src = ["b"] * 30 + ["a"] * 30
    ep = np.tile(np.repeat(np.arange(3), 10), 2)
    st = np.tile(np.arange(10), 6)
    score = ep / 10.0
    score[(np.array(src) == "a") & (ep == 0) & (st >= 4) & (st < 8)] = 5.0  # window 1 of a/0 with H=4
    t = score_table(src, ep, st, score)
    cl, cs = cluster_scores(np.array([1] * 30 + [0] * 30), ep, st, score, "subtraj", 4)
    assert len(cs) == 2 * 3 * 3 and cs.max() == 5.0
    sub = select_steps(t, SelectConfig(top_percent=100 / 18, level="subtraj", horizon=4))
    assert keys(sub) == [("a", 0, s) for s in range(4, 8)]
    epi = select_steps(t, SelectConfig(top_percent=34, level="episode"))  # ceil(6 * 0.34) = 3 episodes
    # a/0 (mean 2.0), then the two episode-2 (0.2) clusters
    assert sorted({(s, e) for s, e, _ in keys(epi)}) == [("a", 0), ("a", 2), ("b", 2)]
    assert epi.num_rows == 30
    thr = select_steps(t, SelectConfig(top_percent=None, threshold=0.15, level="episode"))
    assert sorted({(s, e) for s, e, _ in keys(thr)}) == [("a", 0), ("a", 2), ("b", 2)]


def test_bad_configs_and_scores_fail_clearly():
    with pytest.raises(ValueError, match="at most one of budget_percent, top_percent and threshold"):
        SelectConfig(top_percent=10, threshold=0.5)
    with pytest.raises(ValueError, match=r"budget_percent must be in \(0, 100\]"):
        SelectConfig(budget_percent=120)
    assert SelectConfig().budget_percent == 10.0
    with pytest.raises(ValueError, match=r"top_percent must be in \(0, 100\]"):
        SelectConfig(top_percent=0)
    with pytest.raises(ValueError, match="level must be one of"):
        SelectConfig(level="task")
    t = score_table(["a"] * 3, [0, 0, 0], [0, 1, 2], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="non-finite score at source='a', episode=0, step=1"):
        select_steps(t, SelectConfig())
    neg = score_table(["a"] * 2, [0, 0], [0, 1], [-1.0, -2.0])
    with pytest.raises(ValueError, match="non-negative"):
        select_steps(neg, SelectConfig(top_percent=50, weighting="score"))
    assert select_steps(score_table([], [], [], []), SelectConfig()).num_rows == 0


def ragged_prior(seed: int = 0):
    """40 episodes of 5-200 steps with random scores (ties included): one budget must fit them all."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 200, 40)
    ep = np.repeat(np.arange(40), lengths)
    st = np.concatenate([np.arange(n) for n in lengths])
    score = np.round(rng.random(len(ep)), 1)  # ten distinct values: many ties
    return score_table(["p"] * len(ep), ep, st, score), len(ep)


@pytest.mark.parametrize("level", ["step", "subtraj", "episode"])
@pytest.mark.parametrize("budget", [1.0, 10.0, 37.5])
def test_budget_is_a_share_of_steps_at_every_level(level, budget):
    t, n = ragged_prior()
    sel = select_steps(t, SelectConfig(budget_percent=budget, level=level, horizon=30))
    assert sel.num_rows == round(n * budget / 100)  # exact: the last cluster is cut
    assert len(set(keys(sel))) == sel.num_rows
    if level == "episode":  # whole episodes in score order, one cut at the end to its first steps
        per_ep = {}
        for _, e, st in keys(sel):
            per_ep.setdefault(e, []).append(st)
        full = {e: len(v) for e, v in per_ep.items()}
        lengths = dict(zip(*np.unique(t.column("episode").to_numpy(), return_counts=True)))
        cut = [e for e in full if full[e] < lengths[e]]
        assert len(cut) <= 1 and all(per_ep[e] == list(range(full[e])) for e in cut)


def test_ties_break_by_a_seeded_permutation_not_key_order():
    # 100 one-step clusters, all tied: the top 10 are a seeded draw, not clusters 0..9
    t = score_table(["a"] * 100, np.arange(100), np.zeros(100), np.zeros(100))
    picks = {seed: sorted(e for _, e, _ in keys(select_steps(t, SelectConfig(budget_percent=10, tie_seed=seed))))
             for seed in (0, 1, 2)}
    assert all(len(p) == 10 for p in picks.values())
    assert picks[0] != list(range(10)) and picks[0] != picks[1] != picks[2]
    again = sorted(e for _, e, _ in keys(select_steps(t, SelectConfig(budget_percent=10, tie_seed=0))))
    assert again == picks[0]
    # a strictly better cluster always comes before the tied ones
    better = score_table(["a"] * 100, np.arange(100), np.zeros(100), np.where(np.arange(100) == 57, 1.0, 0.0))
    assert 57 in {e for _, e, _ in keys(select_steps(better, SelectConfig(budget_percent=1, tie_seed=3)))}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store")
    for source, episodes, length in (("metaworld", [7, 3, 5], 6), ("other", [0, 1], 4)):
        ep = np.repeat(episodes, length)
        step = np.tile(np.arange(length), len(episodes))
        n = len(ep)
        s.write_table(steps_key(source), steps_table({
            "source": source, "episode": ep, "step": step, "state": np.zeros((n, 2)), "action": np.zeros((n, 1)),
            "is_first": step == 0, "is_last": step == length - 1, "is_terminal": step == length - 1}),
            "ingest", {}, rows_per_part=7)
    rows = [("metaworld", e, st) for e in (7, 3, 5) for st in range(6)] + [("other", e, st) for e in (0, 1)
                                                                          for st in range(4)]
    score = np.arange(len(rows), dtype=float)
    s.write_table(scores_key("br-run"), score_table(*map(list, zip(*rows)), score), "score",
                  {"method": "br"}, metadata={"method": "br", "target": "reach"})
    return s


def test_run_select_with_lerobot_export_and_resume(store):
    m = run_select(store, "br-run", "sel", SelectConfig(top_percent=20, level="step"), export_lerobot=True)
    sel = store.read_table(selection_key("sel"))
    # top 20% of 26 steps = 6 highest scores: the last six rows of the score table
    assert m.rows == 6 and keys(sel) == [("other", 0, 2), ("other", 0, 3)] + [("other", 1, s) for s in range(4)]
    assert m.metadata["selected_fraction"] == pytest.approx(6 / 26) and m.metadata["method"] == "br"
    lr = store.read_table(lerobot_key("sel"))
    # metaworld: episodes 3, 5, 7 (sorted) -> frames 0..17; other: episode 0 -> 18..21, episode 1 -> 22..25
    assert lr.column("index").to_pylist() == [20, 21, 22, 23, 24, 25]
    assert lr.column("weight").to_pylist() == [1.0] * 6
    m_lr = store.manifest(lerobot_key("sel"))
    assert m_lr.metadata["source_offsets"] == {"metaworld": 0, "other": 18} and m_lr.metadata["total_frames"] == 26
    again = run_select(store, "br-run", "sel", SelectConfig(top_percent=20, level="step"))
    assert again.created == m.created
    m2 = run_select(store, "br-run", "sel-ep", SelectConfig(top_percent=40, level="episode"), export_lerobot=True)
    # episode means: metaworld/7 2.5, 3 8.5, 5 14.5, other/0 19.5, 1 23.5 -> top ceil(2) = other/0, other/1
    assert m2.rows == 8
    ep_sel = store.read_table(lerobot_key("sel-ep")).column("index").to_pylist()
    assert ep_sel == list(range(18, 26))


def test_cli_score_random_and_select(store, tmp_path, capsys):
    from distcur.cli import main

    assert main(["select", "--store", store.uri, "--scores", "br-run", "--run", "cli-sel", "--threshold", "20",
                 "--level", "subtraj", "--horizon", "2", "--export-lerobot"]) == 0
    sel = store.read_table(selection_key("cli-sel"))
    assert sel.num_rows > 0 and store.manifest(lerobot_key("cli-sel")) is not None
    assert main(["select", "--store", store.uri, "--scores", "nope", "--run", "x"]) == 2
    assert "scores/nope is not a committed table" in capsys.readouterr().err
    assert main(["score", "--store", store.uri, "--method", "sr", "--target", "reach", "--run", "r", "--k", "3"]) == 2
    assert "--k" in capsys.readouterr().err


def test_cli_select_from_a_config_file_the_flags_winning(store, tmp_path, capsys):
    from distcur.cli import main

    cfg = tmp_path / "select.yaml"
    cfg.write_text("scores: br-run\nrun: yaml-sel\nselection: {top_percent: 20, level: step}\n"
                   "export: {lerobot: true, alpha: 0.3}\n")
    assert main(["select", "--store", store.uri, "--config", str(cfg)]) == 0
    m = store.manifest(selection_key("yaml-sel"))
    assert m.rows == 6 and store.manifest(lerobot_key("yaml-sel")).metadata["alpha"] == 0.3
    capsys.readouterr()
    assert main(["select", "--store", store.uri, "--config", str(cfg), "--top", "40", "--run", "flag-sel"]) == 0
    assert json.loads(capsys.readouterr().out)["selection"] == "selections/flag-sel"
    assert store.manifest(selection_key("flag-sel")).rows == 11  # ceil(40% of 26 steps)
    # every run name is required, and a sparse export needs the export it thins
    assert main(["select", "--store", store.uri, "--scores", "br-run"]) == 2
    assert "SelectStageConfig.run is required (--run)" in capsys.readouterr().err
    assert main(["select", "--store", store.uri, "--scores", "br-run", "--run", "x", "--export-sparse"]) == 2
    assert "needs export.lerobot (--export-lerobot)" in capsys.readouterr().err


def selection_of(rows: list[tuple[str, int, int]]) -> pa.Table:
    src, ep, st = zip(*rows)
    return pa.Table.from_arrays([pa.array(src, pa.string()), pa.array(ep, pa.int64()), pa.array(st, pa.int32()),
                                 pa.array(np.ones(len(rows)), pa.float32())], schema=SELECTION_SCHEMA)


@pytest.fixture
def composition_store(tmp_path):
    """Four 10-step episodes: 0 a successful 'reach' demo, 1 a failed 'reach' (noisy), 2 a successful
    'push' demo, 3 a failed 'push' (other_expert); the target task is 'reach'."""
    s = Store(tmp_path)
    ep = np.repeat(np.arange(4), 10)
    step = np.tile(np.arange(10), 4)
    task = np.where(ep < 2, "reach", "push").astype(object)
    s.write_table(steps_key("prior"), steps_table({
        "source": "prior", "episode": ep, "step": step, "task": task, "state": np.zeros((40, 2)),
        "action": np.zeros((40, 1)), "is_first": step == 0, "is_last": step == 9, "is_terminal": step == 9,
        "success": np.isin(ep, [0, 2])}), "ingest", {},
        metadata={"episode_modes": ["success", "noisy", "success", "other_expert"]}, rows_per_part=15)
    return s


def test_composition_of_a_known_selection(composition_store):
    # 10 steps of episode 1 (target failure), 5 of episode 2 (success), 5 of episode 3 (failure)
    rows = [("prior", 1, i) for i in range(10)] + [("prior", 2, i) for i in range(5)] + [("prior", 3, i)
                                                                                        for i in range(5)]
    c = selection_composition(composition_store, selection_of(rows), "reach")
    assert c["selected_steps"] == 20 and c["success_share"] == 0.25
    assert c["target_task_share"] == 0.5 and c["target_failure_share"] == 0.5
    assert c["tasks"] == {"reach": 0.5, "push": 0.5}
    assert c["kinds"] == {"noisy": 0.5, "success": 0.25, "other_expert": 0.25}
    with pytest.raises(ValueError, match="episode=7, step=0 is not in"):
        selection_composition(composition_store, selection_of([("prior", 7, 0)]), "reach")
