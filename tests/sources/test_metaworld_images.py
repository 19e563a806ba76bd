"""The rendered MetaWorld variant: frames replayed and rendered headless (MUJOCO_GL=osmesa), and the
image path end to end on those real frames through the CLI: ingest -> embed (conv VAE) -> score
BR / IWR on image latents -> select.

These tests render, so they run in a process of their own (``test_rendering.py`` starts it with
``DISTCUR_RENDER_TESTS=1``): with mujoco's OSMesa backend loaded, importing TensorFlow (which
other tests use to write TFRecord fixtures) crashes the process."""

from __future__ import annotations

import ctypes.util
import json
import os

import numpy as np
import pytest
import yaml

from distcur.cli import main
from distcur.data import embeddings_key, selection_key, steps_key, target_source
from distcur.embed.images import decode_images
from distcur.envs.generation import MetaWorldPriorConfig, generate_episode
from distcur.envs.metaworld import render_episode
from distcur.schema import list_column_to_numpy
from distcur.sources.metaworld import PRIOR_SOURCE, plan_episodes
from distcur.store import Store

pytest.importorskip("PIL.Image")
GL = os.environ.get("MUJOCO_GL", "osmesa")
pytestmark = [
    pytest.mark.skipif(os.environ.get("DISTCUR_RENDER_TESTS") != "1",
                       reason="rendering tests run in their own process (tests/sources/test_rendering.py)"),
    pytest.mark.skipif(GL == "osmesa" and ctypes.util.find_library("OSMesa") is None,
                       reason="no OSMesa for headless rendering (apt-get install libosmesa6)"),
]

TARGET = "reach-v3"
# about 130 frames in all (render time ~0.1-0.5 s a frame on this machine, whatever the size)
TINY = dict(target=TARGET, tasks=[TARGET, "button-press-v3"], success_per_task=1, failed_per_task=1, target_demos=1,
            failed_max_steps=8, max_steps=150, image_size=32, camera="corner")


def test_config_keeps_state_only_fingerprints_and_checks_the_camera():
    plain = MetaWorldPriorConfig(target=TARGET)
    assert "image_size" not in plain.to_dict() and "camera" not in plain.target_config()
    cams = MetaWorldPriorConfig(target=TARGET, image_size=64, camera="topview")
    assert cams.to_dict()["camera"] == "topview" and cams.target_config()["image_size"] == 64
    with pytest.raises(ValueError, match="camera must be one of"):
        MetaWorldPriorConfig(target=TARGET, image_size=64, camera="nope")
    with pytest.raises(ValueError, match=r"image_size must be an int in \[0, 1024\]"):
        MetaWorldPriorConfig(target=TARGET, image_size=-1)


def test_render_replays_the_recorded_episode():
    cfg = MetaWorldPriorConfig(**{**TINY, "tasks": (TARGET,)})
    _, target_specs = plan_episodes(cfg)
    ro, stats = generate_episode(cfg, target_specs[0])
    short = ro.cut(6)
    frames = render_episode(TARGET, stats["seed"], short, 32, "corner")
    assert frames.shape == (6, 32, 32, 3) and frames.dtype == np.uint8
    assert frames.std() > 5  # a scene, not a blank buffer
    np.testing.assert_array_equal(render_episode(TARGET, stats["seed"], short, 32, "corner"), frames)  # deterministic
    assert not np.array_equal(render_episode(TARGET, stats["seed"], short, 32, "topview"), frames)
    wrong = type(short)(short.state.copy(), short.action, short.reward, short.success_step)
    wrong.state[3] += 1.0  # a recording the replay cannot reproduce is an error, not silently other frames
    with pytest.raises(AssertionError, match="diverged from the recorded episode at step 3"):
        render_episode(TARGET, stats["seed"], wrong, 32, "corner")


def test_image_path_end_to_end_on_rendered_frames(ray_session, tmp_path, capsys):
    store_dir = tmp_path / "store"
    (tmp_path / "mw.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["ingest", "metaworld", "--config", str(tmp_path / "mw.yaml"), "--out", str(store_dir),
                 "--heldout-demos", "0"]) == 0
    store = Store(store_dir)
    prior = store.manifest(steps_key(PRIOR_SOURCE))
    assert prior.metadata["camera_names"] == ["corner"] and prior.metadata["image_key"] == "corner"
    assert prior.metadata["render_s"] > 0
    steps = store.read_table(steps_key(PRIOR_SOURCE))
    assert steps.column("image").null_count == 0
    frames = decode_images(steps.column("image").to_pylist()[:20])
    assert frames.shape == (20, 32, 32, 3) and len({f.tobytes() for f in frames}) > 10  # frames move with the arm

    (tmp_path / "embed.yaml").write_text(yaml.safe_dump({"encoder_options": {
        "image_size": 32, "channels": [8, 16], "latent_dim": 8, "train_steps": 40, "batch_size": 32}}))
    capsys.readouterr()
    assert main(["embed", "--store", str(store_dir), "--encoder", "image-vae", "--config", str(tmp_path / "embed.yaml"),
                 "--device", "auto", "--concurrency", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[embeddings_key("image-vae", PRIOR_SOURCE)]["rows"] == steps.num_rows
    assert out[embeddings_key("image-vae", PRIOR_SOURCE)]["dim"] == 8 + 4
    z = list_column_to_numpy(store.read_table(embeddings_key("image-vae", PRIOR_SOURCE)).column("z"), "z")
    assert np.isfinite(z).all() and z[:, :8].std(0).min() > 0  # latents vary over the frames

    for method in ("br", "iwr"):
        assert main(["score", "--store", str(store_dir), "--method", method, "--target", TARGET, "--run",
                     f"img-{method}", "--encoder", "image-vae"]) == 0
        assert main(["select", "--store", str(store_dir), "--scores", f"img-{method}", "--budget", "25",
                     "--level", "step", "--run", f"img-{method}"]) == 0
        sel = store.read_table(selection_key(f"img-{method}"))
        assert 0 < sel.num_rows <= int(np.ceil(0.25 * steps.num_rows)) + 1
        assert set(sel.column("source").to_pylist()) == {PRIOR_SOURCE}
    assert store.manifest(steps_key(target_source(TARGET))).metadata["camera_names"] == ["corner"]
