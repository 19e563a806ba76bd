"""A small LeRobot v3 dataset written per its layout (meta/info.json, meta/tasks.parquet,
meta/episodes/chunk-000/file-000.parquet, data/chunk-000/file-00N.parquet), state-only.

The task table is written as lerobot writes it: a pandas DataFrame of ``task_index`` indexed by
the task string; episodes are laid end to end and their frames' ``index`` is the running count
(``dataset_from_index + frame_index``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TASKS = ["pick up the cube", "open the drawer"]
STATE_DIM, ACTION_DIM, FPS = 6, 4, 10


@dataclass
class LeRobotFixture:
    root: str
    frames: pa.Table  # every data row, in file order
    lengths: list[int]


VIDEO_KEY, VIDEO_SIZE = "observation.images.cam", 32


def video_value(episode: int, frame_index: int) -> int:
    """The grey level of a fixture video frame: it tells the decoded frames apart."""
    return 30 + 25 * frame_index + 7 * episode


def write_video(path: str, values: list[int], codec: str = "libx264") -> None:
    """An mp4 of uniform grey frames at FPS, with PyAV (lossy: decoded levels are within a few units)."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        for v in values:
            frame = av.VideoFrame.from_ndarray(np.full((VIDEO_SIZE, VIDEO_SIZE, 3), v, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_lerobot(root, lengths=(4, 6, 3, 5, 2), episodes_per_file: int = 3, seed: int = 0,
                 first_index: int = 0, video: bool = False) -> LeRobotFixture:
    """``video``: also a camera ``observation.images.cam`` stored as LeRobot stores video features, one
    mp4 per data file with its episodes end to end (meta/episodes' videos/<key>/from_timestamp)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    os.makedirs(f"{root}/meta/episodes/chunk-000", exist_ok=True)
    os.makedirs(f"{root}/data/chunk-000", exist_ok=True)
    features = {
        "observation.state": {"dtype": "float32", "shape": [STATE_DIM], "names": None},
        "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    if video:
        features[VIDEO_KEY] = {"dtype": "video", "shape": [VIDEO_SIZE, VIDEO_SIZE, 3],
                               "names": ["height", "width", "channels"],
                               "info": {"video.fps": FPS, "video.codec": "h264", "video.pix_fmt": "yuv420p"}}
    info = {"codebase_version": "v3.0", "robot_type": "test", "total_episodes": len(lengths),
            "total_frames": int(sum(lengths)), "total_tasks": len(TASKS), "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 500, "fps": FPS, "splits": {"train": f"0:{len(lengths)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if video else None,
            "features": features}
    with open(f"{root}/meta/info.json", "w") as f:
        json.dump(info, f, indent=2)
    pd.DataFrame({"task_index": list(range(len(TASKS)))}, index=TASKS).to_parquet(f"{root}/meta/tasks.parquet")
    rows_by_file: dict[int, list[dict]] = {}
    ep_rows, index = [], first_index
    video_values: dict[int, list[int]] = {}
    for e, n in enumerate(lengths):
        file_index = e // episodes_per_file
        task_index = e % len(TASKS)
        ep_rows.append({"episode_index": e, "tasks": [TASKS[task_index]], "length": n, "data/chunk_index": 0,
                        "data/file_index": file_index, "dataset_from_index": index, "dataset_to_index": index + n,
                        "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        if video:
            values = video_values.setdefault(file_index, [])
            ep_rows[-1].update({f"videos/{VIDEO_KEY}/chunk_index": 0, f"videos/{VIDEO_KEY}/file_index": file_index,
                                f"videos/{VIDEO_KEY}/from_timestamp": len(values) / FPS,
                                f"videos/{VIDEO_KEY}/to_timestamp": (len(values) + n) / FPS})
            values += [video_value(e, t) for t in range(n)]
        for t in range(n):
            rows_by_file.setdefault(file_index, []).append({
                "observation.state": rng.normal(size=STATE_DIM).astype(np.float32).tolist(),
                "action": rng.normal(size=ACTION_DIM).astype(np.float32).tolist(),
                "timestamp": np.float32(t / FPS), "frame_index": t, "episode_index": e, "index": index + t,
                "task_index": task_index})
        index += n
    schema = pa.schema([("observation.state", pa.list_(pa.float32(), STATE_DIM)),
                        ("action", pa.list_(pa.float32(), ACTION_DIM)), ("timestamp", pa.float32()),
                        ("frame_index", pa.int64()), ("episode_index", pa.int64()), ("index", pa.int64()),
                        ("task_index", pa.int64())])
    tables = []
    for file_index, rows in sorted(rows_by_file.items()):
        t = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(t, f"{root}/data/chunk-000/file-{file_index:03d}.parquet")
        tables.append(t)
    pq.write_table(pa.Table.from_pylist(ep_rows), f"{root}/meta/episodes/chunk-000/file-000.parquet")
    for file_index, values in video_values.items():
        write_video(f"{root}/videos/{VIDEO_KEY}/chunk-000/file-{file_index:03d}.mp4", values)
    return LeRobotFixture(str(root), pa.concat_tables(tables), list(lengths))
