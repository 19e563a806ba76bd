"""A small synthetic prior for the datamodel tests: even episodes demonstrate the target's
behaviour, odd ones its opposite (shared by tests/stages/test_datamodel.py and the executor tests)."""

from __future__ import annotations

import numpy as np

from distcur.data import steps_key, target_source
from distcur.schema import steps_table
from distcur.store import Store

TASK = "synth-reach"
DS, DA, LENGTH = 6, 2, 30


def episodes(source: str, signs: np.ndarray, rng: np.random.Generator):
    """Episodes whose actions follow +A s (the target's behaviour) or -A s (the opposite)."""
    a_true = np.random.default_rng(123).normal(size=(DA, DS)) / np.sqrt(DS)
    n = len(signs) * LENGTH
    states = rng.normal(size=(n, DS)).astype(np.float32)
    sign = np.repeat(signs, LENGTH)[:, None]
    actions = np.tanh(sign * 2 * states @ a_true.T + 0.1 * rng.normal(size=(n, DA))).astype(np.float32)
    step = np.tile(np.arange(LENGTH), len(signs))
    return steps_table({
        "source": source, "episode": np.repeat(np.arange(len(signs)), LENGTH), "step": step,
        "task": [TASK] * n, "state": states, "action": actions, "is_first": step == 0,
        "is_last": step == LENGTH - 1, "is_terminal": np.zeros(n, bool), "success": np.repeat(signs > 0, LENGTH),
    })


def make_synthetic_store(root, n_prior: int = 24, seed: int = 0) -> tuple[Store, np.ndarray]:
    """A prior whose even episodes demonstrate the target's behaviour and odd ones its opposite."""
    rng = np.random.default_rng(seed)
    good = np.arange(n_prior) % 2 == 0
    store = Store(str(root))
    store.write_table(steps_key("metaworld"), episodes("metaworld", np.where(good, 1.0, -1.0), rng), stage="ingest")
    store.write_table(steps_key(target_source(TASK)), episodes(target_source(TASK), np.ones(4), rng), stage="ingest")
    return store, good


SMALL = {
    "hidden": [16, 16],
    "batch_size": 64,
    "lr": 3e-3,
    "regression": {"num_models": 24, "heldout_models": 8, "steps": 60, "models_per_batch": 8, "cv_folds": 3},
    "metagrad": {"total_steps": 100, "meta_steps": 12, "iterations": 4},
}
