"""An up-to-date stage says so without starting Ray; a manifest's wall time is the stage's whole time."""

from __future__ import annotations

import numpy as np
import pytest

from distcur.data import steps_key
from distcur.distributed import session
from distcur.schema import steps_table
from distcur.stages.embed import EmbedConfig, encoder_key
from distcur.stages.embed import run as run_embed
from distcur.store import Store


def _source(store: Store, source: str, episodes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = episodes * 20
    step = np.tile(np.arange(20), episodes)
    store.write_table(steps_key(source), steps_table({
        "source": source, "episode": np.repeat(np.arange(episodes), 20), "step": step, "task": ["reach"] * n,
        "state": rng.normal(size=(n, 6)), "action": np.tanh(rng.normal(size=(n, 2))), "is_first": step == 0,
        "is_last": step == 19, "is_terminal": step == 19}), "ingest", {"seed": seed})


def test_up_to_date_embed_starts_no_ray(tmp_path, ray_session, monkeypatch):
    store = Store(tmp_path)
    _source(store, "prior", 10, 0)
    _source(store, "target-reach", 2, 1)
    config = EmbedConfig(encoder="vae", encoder_options={"train_steps": 300, "hidden": [16]}, batch_size=64,
                         concurrency=1)
    first = run_embed(store, config)
    # the fit runs before the encoder's writer commits: its time is in the manifest
    assert store.manifest(encoder_key("vae")).wall_s > 0.05
    monkeypatch.setattr(session, "ensure_ray", lambda *a, **k: pytest.fail("an up-to-date embed started Ray"))
    again = run_embed(store, config)
    assert {k: m.created for k, m in again.items()} == {k: m.created for k, m in first.items()}
