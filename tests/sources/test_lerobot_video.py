"""LeRobot v3 video features: the camera's frames decoded from the dataset's mp4 files with PyAV
(no torchvision), at each episode's from_timestamp + frame_index / fps, into the `image` column."""

from __future__ import annotations

import numpy as np
import pytest

from distcur.data import steps_key
from distcur.embed.images import decode_images
from distcur.sources.common import SourceFormatError
from distcur.sources.lerobot import LeRobotConfig
from distcur.sources.video import video_frames
from distcur.store import Store
from tests.ingest_calls import ingest_lerobot
from tests.lerobot_factory import FPS, VIDEO_KEY, make_lerobot, video_value, write_video

pytest.importorskip("av")
pytest.importorskip("PIL.Image")


def test_video_frames_are_the_ones_at_the_timestamps(tmp_path):
    path = str(tmp_path / "v.mp4")
    write_video(path, [20 + 10 * i for i in range(12)])
    got = decode_images(video_frames(path, np.array([0.3, 0.4, 0.7]), FPS, "v.mp4"))
    assert got.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(got.reshape(3, -1).mean(1), [50, 60, 90], atol=3)
    with pytest.raises(SourceFormatError, match=r"v.mp4: the video ends before timestamp 1.5000 s \(1 of 2"):
        video_frames(path, np.array([1.1, 1.5]), FPS, "v.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    with pytest.raises(SourceFormatError, match="bad.mp4: cannot decode the video"):
        video_frames(str(tmp_path / "bad.mp4"), np.array([0.0]), FPS, "bad.mp4")


def test_ingest_decodes_a_video_camera_per_episode(tmp_path):
    fx = make_lerobot(tmp_path / "ds", lengths=(4, 6, 3, 5), episodes_per_file=2, video=True)
    store = Store(tmp_path / "store")
    result = ingest_lerobot(fx.root, store, "cam", LeRobotConfig(image_key=VIDEO_KEY), progress=False)
    table = store.read_table(steps_key("cam")).sort_by([("episode", "ascending"), ("step", "ascending")])
    assert table.num_rows == sum(fx.lengths) and table.column("image").null_count == 0
    levels = decode_images(table.column("image").to_pylist()).reshape(table.num_rows, -1).mean(1)
    expect = [video_value(e, t) for e, n in enumerate(fx.lengths) for t in range(n)]
    np.testing.assert_allclose(levels, expect, atol=3)  # the second file's episodes start at their own offset
    meta = result.manifest.metadata["cam"]
    assert meta["camera_names"] == [VIDEO_KEY] and meta["image_key"] == VIDEO_KEY
    # a missing video is named with the file meta/episodes points at
    (tmp_path / "ds" / "videos" / VIDEO_KEY / "chunk-000" / "file-001.mp4").unlink()
    with pytest.raises(SourceFormatError, match=r"file-001.mp4: video file named by meta/episodes is missing"):
        ingest_lerobot(fx.root, Store(tmp_path / "s2"), "cam", LeRobotConfig(image_key=VIDEO_KEY), progress=False)
