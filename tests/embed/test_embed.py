"""Embedding: the VAE trains; Ray Data embedding equals in-process embedding; resume; encoder registry."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from distcur.data import embeddings_key, steps_key
from distcur.distributed.embed import (
    EmbedConfig,
    embed_table,
    encoder_key,
    load_encoder,
    run_embed,
    sample_steps,
)
from distcur.embed.encoders import available_encoders, build_encoder
from distcur.embed.vae import VAEConfig, train_vae, vae_embed, vae_from_bytes, vae_to_bytes
from distcur.schema import EMBEDDING_SCHEMA, list_column_to_numpy, steps_table
from distcur.store import Store


def write_source(store: Store, source: str, episodes: int, length: int, seed: int, rows_per_part: int) -> None:
    rng = np.random.default_rng(seed)
    n = episodes * length
    state = rng.normal(size=(n, 39)).astype(np.float32)
    state[:, 20] = 0.5  # a constant state dim, as MetaWorld's padded slots are
    action = np.tanh(state[:, :4] + 0.1 * rng.normal(size=(n, 4))).astype(np.float32)
    step = np.tile(np.arange(length), episodes)
    table = steps_table({"source": source, "episode": np.repeat(np.arange(episodes) + 100, length), "step": step,
                         "task": ["reach"] * n, "state": state, "action": action,
                         "is_first": step == 0, "is_last": step == length - 1, "is_terminal": step == length - 1})
    store.write_table(steps_key(source), table, "ingest", {"seed": seed}, rows_per_part=rows_per_part)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("store"))
    write_source(s, "metaworld", episodes=12, length=50, seed=0, rows_per_part=170)
    write_source(s, "target-reach", episodes=2, length=50, seed=1, rows_per_part=1000)
    return s


def test_vae_trains_and_round_trips():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(2000, 3))
    state = (latent @ rng.normal(size=(3, 10))).astype(np.float32)
    action = (latent @ rng.normal(size=(3, 4))).astype(np.float32)
    torch.set_num_threads(1)  # a tiny MLP: threads only contend on a shared 2-core machine
    model, hist = train_vae(state, action, VAEConfig(train_steps=120, hidden=(32, 32), batch_size=64, lr=3e-3))
    assert hist["recon"][-1] < 0.7 * hist["recon"][0]
    z = vae_embed(model, state[:7], action[:7])
    assert z.shape == (7, 14 + 4) and np.array_equal(z[:, 14:], action[:7])
    np.testing.assert_array_equal(vae_embed(vae_from_bytes(vae_to_bytes(model)), state[:7], action[:7]), z)
    with pytest.raises(ValueError, match="state dim 10"):
        vae_embed(model, state[:3, :9], action[:3])
    with pytest.raises(ValueError, match="at least 2 steps"):
        train_vae(state[:1], action[:1])


def test_registry_and_config_errors():
    assert {"vae", "state", "action", "state-action", "image"} <= set(available_encoders())
    with pytest.raises(ValueError, match="unknown encoder 'dino'"):
        build_encoder("dino")
    with pytest.raises(ValueError, match="bad options"):
        build_encoder("vae", {"latent": 3})
    with pytest.raises(ValueError, match="package.module:callable"):
        build_encoder("image", {"factory": "no_colon"})
    with pytest.raises(ValueError, match="must be fit"):
        build_encoder("vae").encode({"state": np.zeros((1, 2)), "action": np.zeros((1, 1))})


def test_streaming_sample_is_uniform_and_bounded(store):
    sample = sample_steps(store, ["metaworld"], ("state", "action"), max_rows=200, seed=0)
    assert sample["state"].shape == (200, 39) and sample["action"].shape == (200, 4)
    full = list_column_to_numpy(store.read_table(steps_key("metaworld")).column("state"), "state")
    rows = {tuple(r) for r in full.round(5).tolist()}
    assert all(tuple(r) in rows for r in sample["state"].round(5).tolist())


def test_ray_data_embedding_equals_in_process(store, ray_session):
    config = EmbedConfig(encoder="vae", encoder_options={"train_steps": 20, "hidden": [16, 16]},
                         max_fit_rows=400, batch_size=64, concurrency=2)
    manifests = run_embed(store, config)
    assert set(manifests) == {embeddings_key("vae", "metaworld"), embeddings_key("vae", "target-reach")}
    enc_manifest = store.manifest(encoder_key("vae"))
    assert enc_manifest.config["fit_sources"] == ["metaworld"] and enc_manifest.metadata["fit"]["rows"] == 400
    encoder = load_encoder(store, "vae")
    for source in ("metaworld", "target-reach"):
        got = store.read_table(embeddings_key("vae", source))
        assert got.schema.equals(EMBEDDING_SCHEMA, check_metadata=False)
        steps = store.read_table(steps_key(source))
        assert got.num_rows == steps.num_rows == manifests[embeddings_key("vae", source)].rows
        expected = embed_table(encoder, steps.select(["source", "episode", "step", "state", "action"]))
        got = got.sort_by([("episode", "ascending"), ("step", "ascending")])
        expected = expected.sort_by([("episode", "ascending"), ("step", "ascending")])
        assert got.column("episode").equals(expected.column("episode"))
        assert got.column("step").equals(expected.column("step"))
        z_got = list_column_to_numpy(got.column("z"), "z")
        assert z_got.shape[1] == 14 + 4 == manifests[embeddings_key("vae", source)].metadata["dim"]
        np.testing.assert_allclose(z_got, list_column_to_numpy(expected.column("z"), "z"), rtol=1e-5, atol=1e-5)
    # a rerun with the same config and inputs is skipped (same manifests, nothing refit)
    again = run_embed(store, config)
    assert {k: m.created for k, m in again.items()} == {k: m.created for k, m in manifests.items()}
    assert store.manifest(encoder_key("vae")).created == enc_manifest.created


def test_raw_encoder_and_empty_table(store, ray_session):
    manifests = run_embed(store, EmbedConfig(encoder="action", sources=["target-reach"], batch_size=32))
    z = list_column_to_numpy(store.read_table(embeddings_key("action", "target-reach")).sort_by(
        [("episode", "ascending"), ("step", "ascending")]).column("z"), "z")
    action = list_column_to_numpy(store.read_table(steps_key("target-reach")).column("action"), "action")
    np.testing.assert_array_equal(z, action)
    assert manifests[embeddings_key("action", "target-reach")].metadata["dim"] == 4
    empty = pa.table({"source": pa.array([], pa.string()), "episode": pa.array([], pa.int64()),
                      "step": pa.array([], pa.int32()), "action": pa.array([], pa.list_(pa.float32()))})
    assert embed_table(build_encoder("action"), empty).num_rows == 0
