"""Toy episodes for the policy and train-stage tests: a smooth system whose action is a fixed
function of the state, and a store holding a target and a prior source of them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distcur.data import steps_key
from distcur.schema import SELECTION_SCHEMA, steps_table
from distcur.store import Store

STATE_DIM, ACTION_DIM = 5, 2


def make_episodes(source: str, n_episodes: int, length: int, seed: int, task: str = "toy") -> pa.Table:
    """Episodes of a smooth toy system whose action is a fixed function of the state."""
    rng = np.random.default_rng(seed)
    proj = np.random.default_rng(123).normal(size=(STATE_DIM, ACTION_DIM))
    cols = {k: [] for k in ("episode", "step", "state", "action", "is_first", "is_last", "is_terminal")}
    for e in range(n_episodes):
        s = rng.normal(size=(length, STATE_DIM))
        a = 0.9 * np.tanh(s @ proj * 0.5)
        cols["episode"] += [e] * length
        cols["step"] += list(range(length))
        cols["state"].append(s)
        cols["action"].append(a)
        cols["is_first"] += [i == 0 for i in range(length)]
        cols["is_last"] += [i == length - 1 for i in range(length)]
        cols["is_terminal"] += [False] * length
    cols["state"] = np.concatenate(cols["state"]).astype(np.float32)
    cols["action"] = np.concatenate(cols["action"]).astype(np.float32)
    return steps_table({**cols, "source": source, "task": [task] * len(cols["episode"])})


def toy_store_factory(tmp_path):
    """``build(n_target, n_prior, length)``: a store holding a target source and a prior source of toy
    episodes (each test module's ``store_factory`` fixture)."""

    def build(n_target: int = 4, n_prior: int = 10, length: int = 20) -> Store:
        store = Store(tmp_path / "store")
        store.write_table(steps_key("target-toy"), make_episodes("target-toy", n_target, length, 1), stage="test")
        store.write_table(steps_key("prior"), make_episodes("prior", n_prior, length, 2), stage="test")
        return store

    return build


def selection(rows: list[tuple], source: str = "prior") -> pa.Table:
    return pa.table(
        {"source": [r[0] if len(r) == 4 else source for r in rows],
         "episode": [r[-3] for r in rows], "step": [r[-2] for r in rows], "weight": [r[-1] for r in rows]}
    ).cast(SELECTION_SCHEMA)
