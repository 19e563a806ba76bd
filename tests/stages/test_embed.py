"""The embed stage: a streamed fit sample; Ray Data embedding equals in-process embedding; resume; image frames."""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from distcur.data import embeddings_key, steps_key
from distcur.embed import images as im
from distcur.embed.encoders import build_encoder
from distcur.schema import EMBEDDING_SCHEMA, list_column_to_numpy, steps_table
from distcur.stages.embed import EmbedConfig, embed_table, encoder_key, load_encoder, run, sample_steps
from distcur.store import Store

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from image_factory import write_image_source  # noqa: E402


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


def test_streaming_sample_is_uniform_and_bounded(store):
    sample = sample_steps(store, ["metaworld"], ("state", "action"), max_rows=200, seed=0)
    assert sample["state"].shape == (200, 39) and sample["action"].shape == (200, 4)
    full = list_column_to_numpy(store.read_table(steps_key("metaworld")).column("state"), "state")
    rows = {tuple(r) for r in full.round(5).tolist()}
    assert all(tuple(r) in rows for r in sample["state"].round(5).tolist())


def test_ray_data_embedding_equals_in_process(store, ray_session):
    config = EmbedConfig(encoder="vae", encoder_options={"train_steps": 20, "hidden": [16, 16]},
                         max_fit_rows=400, batch_size=64, concurrency=2)
    manifests = run(store, config)
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
    again = run(store, config)
    assert {k: m.created for k, m in again.items()} == {k: m.created for k, m in manifests.items()}
    assert store.manifest(encoder_key("vae")).created == enc_manifest.created


def test_raw_encoder_and_empty_table(store, ray_session):
    manifests = run(store, EmbedConfig(encoder="action", sources=["target-reach"], batch_size=32))
    z = list_column_to_numpy(store.read_table(embeddings_key("action", "target-reach")).sort_by(
        [("episode", "ascending"), ("step", "ascending")]).column("z"), "z")
    action = list_column_to_numpy(store.read_table(steps_key("target-reach")).column("action"), "action")
    np.testing.assert_array_equal(z, action)
    assert manifests[embeddings_key("action", "target-reach")].metadata["dim"] == 4
    empty = pa.table({"source": pa.array([], pa.string()), "episode": pa.array([], pa.int64()),
                      "step": pa.array([], pa.int32()), "action": pa.array([], pa.list_(pa.float32()))})
    assert embed_table(build_encoder("action"), empty).num_rows == 0


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    pytest.importorskip("PIL.Image")
    s = Store(tmp_path_factory.mktemp("images"))
    write_image_source(s, "cams", episodes=6, length=30, seed=0, rows_per_part=50)
    write_image_source(s, "target-reach", episodes=2, length=30, seed=1, fmt="jpeg")
    return s


def test_image_sample_is_capped_and_embed_table_names_a_bad_frame(image_store):
    sample = sample_steps(image_store, ["cams"], ("image", "action", "source", "episode", "step"), 40, seed=0)
    assert len(sample["image"]) == 40 and isinstance(sample["image"][0], bytes)
    enc = build_encoder("image-vae", {"image_size": 32, "channels": [8, 16], "latent_dim": 4, "train_steps": 2})
    enc.fit(sample)
    table = image_store.read_table(steps_key("cams")).slice(0, 5)
    images = table.column("image").to_pylist()
    images[3] = b"broken"
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    with pytest.raises(im.ImageDecodeError, match=r"source='cams', episode=0, step=3 is not a decodable"):
        embed_table(enc, table)


def test_embed_stage_on_images_through_ray_data(image_store, ray_session):
    cfg = EmbedConfig(encoder="image-vae", encoder_options={"image_size": 32, "channels": [8, 16], "latent_dim": 6,
                                                           "train_steps": 30, "fit_rows": 100},
                      batch_size=40, concurrency=1, device="auto")
    out = run(image_store, cfg)
    assert set(out) == {embeddings_key("image-vae", "cams"), embeddings_key("image-vae", "target-reach")}
    enc_manifest = image_store.manifest("encoders/image-vae")
    assert enc_manifest.metadata["fit"]["rows"] == 100 and enc_manifest.metadata["fit"]["device"] == "cpu"
    encoder = load_encoder(image_store, "image-vae")
    for src, rows in (("cams", 180), ("target-reach", 60)):
        m = out[embeddings_key("image-vae", src)]
        assert m.rows == rows and m.metadata["dim"] == 6 + 4 and m.metadata["gpus_per_actor"] == 0
        got = image_store.read_table(embeddings_key("image-vae", src)).sort_by([("episode", "ascending"),
                                                                                  ("step", "ascending")])
        steps = image_store.read_table(steps_key(src)).sort_by([("episode", "ascending"), ("step", "ascending")])
        expect = embed_table(encoder, steps)  # the same encoder in this process
        np.testing.assert_allclose(list_column_to_numpy(got.column("z"), "z"),
                                   list_column_to_numpy(expect.column("z"), "z"), rtol=1e-5, atol=1e-6)
    # the device is how the work runs, not what it computes: a rerun with --device cpu is skipped
    again = run(image_store, EmbedConfig(**{**cfg.__dict__, "device": "cpu"}))
    assert {k: m.fingerprint for k, m in again.items()} == {k: m.fingerprint for k, m in out.items()}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' was asked for but the local Ray has no GPU"):
            run(Store(image_store.uri, force=True), EmbedConfig(**{**cfg.__dict__, "device": "cuda"}))
