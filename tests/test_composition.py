"""Selection make-up on a store whose answer is known; paired differences between methods."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from distcur.composition import pairwise_jaccard, selection_composition
from distcur.data import steps_key
from distcur.schema import SELECTION_SCHEMA, steps_table
from distcur.stats import paired_comparisons, paired_difference
from distcur.store import Store


def selection(rows: list[tuple[str, int, int]]) -> pa.Table:
    src, ep, st = zip(*rows)
    return pa.Table.from_arrays([pa.array(src, pa.string()), pa.array(ep, pa.int64()), pa.array(st, pa.int32()),
                                 pa.array(np.ones(len(rows)), pa.float32())], schema=SELECTION_SCHEMA)


@pytest.fixture
def store(tmp_path):
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


def test_composition_of_a_known_selection(store):
    # 10 steps of episode 1 (target failure), 5 of episode 2 (success), 5 of episode 3 (failure)
    rows = [("prior", 1, i) for i in range(10)] + [("prior", 2, i) for i in range(5)] + [("prior", 3, i)
                                                                                        for i in range(5)]
    c = selection_composition(store, selection(rows), "reach")
    assert c["selected_steps"] == 20 and c["success_share"] == 0.25
    assert c["target_task_share"] == 0.5 and c["target_failure_share"] == 0.5
    assert c["tasks"] == {"reach": 0.5, "push": 0.5}
    assert c["kinds"] == {"noisy": 0.5, "success": 0.25, "other_expert": 0.25}
    with pytest.raises(ValueError, match="episode=7, step=0 is not in"):
        selection_composition(store, selection([("prior", 7, 0)]), "reach")


def test_jaccard_between_selections():
    a = selection([("p", 0, i) for i in range(4)])
    b = selection([("p", 0, i) for i in range(2, 6)])
    out = pairwise_jaccard({"a": a, "b": b, "c": a})
    assert out["a"]["b"] == pytest.approx(2 / 6, abs=1e-4) and out["a"]["c"] == 1.0
    assert out["b"] == pytest.approx({"a": 2 / 6, "c": 2 / 6}, abs=1e-4)


def test_paired_difference_and_comparisons():
    d = paired_difference({0: 0.6, 1: 0.7, 2: 0.8}, {0: 0.5, 1: 0.5, 2: 0.6})
    assert d["mean"] == pytest.approx(0.1667, abs=1e-4) and d["seeds"] == 3
    # t(0.975, 2) = 4.303: the interval is mean +- 4.303 * s.e.
    assert d["ci"][1] - d["mean"] == pytest.approx(4.303 * d["se"], rel=1e-3)
    assert paired_difference({0: 0.5}, {0: 0.1, 1: 0.2})["seeds"] == 1
    rows = [{"method": m, "seed": s, "success": v} for m, vals in
            {"random": (0.5, 0.5, 0.6), "br": (0.6, 0.7, 0.8), "sr": (0.1, 0.2, 0.1), "dm": (0.9, 0.9, 0.9)}.items()
            for s, v in enumerate(vals)]
    cmp = paired_comparisons(pa.Table.from_pylist(rows))
    assert cmp["dm"]["best_similarity"]["reference"] == "br"
    assert cmp["dm"]["random"]["mean"] == pytest.approx(0.9 - 1.6 / 3)
    assert cmp["br"]["best_similarity"]["mean"] == 0.0
