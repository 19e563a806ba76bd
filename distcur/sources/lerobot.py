"""LeRobot v3 datasets into the canonical step table.

A LeRobot v3 dataset root (local or ``s3://``)::

    meta/info.json                        codebase_version v3.x, fps, features, data_path template
    meta/tasks.parquet                    task_index, the task string as the (pandas) index
    meta/episodes/chunk-*/file-*.parquet  episode_index, length, dataset_from_index/_to_index,
                                          data/chunk_index, data/file_index, tasks, ...
    data/chunk-*/file-*.parquet           one row per frame: index, episode_index, frame_index,
                                          timestamp, task_index, observation.state, action, ...
    videos/<camera>/chunk-*/file-*.mp4    video features: episodes laid end to end, from
                                          meta/episodes' videos/<camera>/from_timestamp

Mapping: ``episode`` = ``episode_index``, ``step`` = ``frame_index`` (checked to count 0..length-1),
``state`` / ``action`` = the ``state_key`` / ``action_key`` features, ``task`` = the task of
``task_index`` in the dataset's task table, ``reward`` / ``is_terminal`` = ``next.reward`` /
``next.done`` when present, ``image`` = the encoded bytes of an ``image`` feature when asked, or
of a ``video`` feature's frames (decoded with PyAV, the ``video`` extra, at the episode's
``from_timestamp + frame_index / fps``, re-encoded PNG; :mod:`distcur.sources.video`). The
dataset's own frame ``index`` is checked to be ``dataset_from_index + frame_index`` of its episode
and recorded per episode in the manifest (``episode_info``: episode_index, from_index, length), so
``distcur select --export-lerobot`` writes the dataset's ``index``, not a count of distcur's.

Two readers give the same table:

- ``ray.data.read_lerobot`` (Ray >= 2.60), when the ``lerobot`` package (>= 0.5, which needs
  Python >= 3.12) is importable: Ray's reader (:func:`distcur.distributed.ingest.read_lerobot_batches`)
  streams the frames, the driver converts whole episodes (:func:`convert_frame_batches`) and
  writes the parts;
- otherwise, and with ``--no-ray``, one task per data file (:func:`ingest_lerobot_file`: Ray Data
  over the files, or in process) reads the Parquet frames itself, and decodes a video camera's
  frames itself.

The stage :func:`distcur.stages.ingest.run_lerobot` picks the reader and commits the table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distcur.fs import resolve
from distcur.sources.common import (
    PartWriter,
    ShardResult,
    Sink,
    SourceFormatError,
    encode_image,
    episode_flags,
)

STAGE = "ingest-lerobot"
KEY_COLUMNS = ("index", "episode_index", "frame_index")


@dataclass(frozen=True)
class LeRobotConfig:
    """Which features of a LeRobot dataset make the step table's columns."""

    state_key: str = field(default="observation.state", metadata={"help": "feature used as state"})
    action_key: str = field(default="action", metadata={"help": "feature used as action"})
    image_key: str | None = field(default=None, metadata={  # an `image` feature (encoded bytes) or a `video` one
        "help": "a camera kept (encoded) in image: an image feature, or a video feature whose mp4 frames are "
                "decoded with PyAV (the video extra)"})
    reward_key: str = field(default="next.reward", metadata={"help": "feature used as reward, when present"})
    done_key: str = field(default="next.done", metadata={"help": "feature used as is_terminal, when present"})

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LeRobotDataset:
    uri: str
    info: dict
    tasks: dict[int, str]
    episodes: dict[int, dict[str, Any]]  # episode_index -> length, from_index, to_index, file
    files: list[str]  # data files relative to the root, in order
    sizes: dict[str, int]

    @property
    def fps(self) -> float | None:
        return self.info.get("fps")

    def identity(self) -> dict:
        """Identity of the input (what the stage fingerprints): info.json and the files' sizes."""
        return {"info": self.info, "files": self.sizes}


@dataclass(frozen=True)
class LeRobotShard:
    uri: str  # the dataset root
    file: str  # one data file, relative to the root
    index: int


def _read_json(fs, path: str, uri: str) -> dict:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError) as e:
        if isinstance(e, FileNotFoundError) or "does not exist" in str(e) or "NoSuchKey" in str(e):
            raise SourceFormatError(f"{uri}: missing meta/info.json: not a LeRobot dataset root") from None
        raise
    except json.JSONDecodeError as e:
        raise SourceFormatError(f"{uri}/meta/info.json: not valid JSON ({e})") from e


def _table(fs, path: str, uri: str, what: str) -> pa.Table:
    try:
        return pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        raise SourceFormatError(f"{uri}: missing {what}") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceFormatError(f"{uri}: cannot read {what} ({e})") from e


def task_table(table: pa.Table, where: str) -> dict[int, str]:
    """{task_index: task} of meta/tasks.parquet (the task string is the pandas index or a `task` column)."""
    if "task_index" not in table.column_names:
        raise SourceFormatError(f"{where}: no 'task_index' column; it has {table.column_names}")
    name = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if name is None:
        meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
        index = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
        name = index[0] if index else None
    if name is None:
        raise SourceFormatError(f"{where}: no task strings (expected the pandas index or a 'task' column)")
    return dict(zip((int(i) for i in table.column("task_index").to_pylist()), table.column(name).to_pylist()))


def open_lerobot(uri: str, config: LeRobotConfig) -> LeRobotDataset:
    """Read meta/ of a LeRobot v3 root; errors name the file and the key that is missing or wrong."""
    uri = str(uri).rstrip("/")
    fs, root = resolve(uri)
    info = _read_json(fs, f"{root}/meta/info.json", uri)
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3"):
        raise SourceFormatError(f"{uri}/meta/info.json: codebase_version {version!r}; expected a LeRobot v3 dataset "
                                "(convert older ones with lerobot's convert_dataset_v21_to_v30)")
    features = info.get("features") or {}
    for what, key in (("state", config.state_key), ("action", config.action_key)):
        if key not in features:
            raise SourceFormatError(f"{uri}/meta/info.json: no feature {key!r} for {what}; the features are "
                                    f"{sorted(features)}")
    if config.image_key and (features.get(config.image_key) or {}).get("dtype") not in ("image", "video"):
        dtype = (features.get(config.image_key) or {}).get("dtype")
        raise SourceFormatError(f"{uri}/meta/info.json: feature {config.image_key!r} is {dtype!r}; expected an "
                                "'image' or 'video' feature")
    video_key = config.image_key if config.image_key and features[config.image_key]["dtype"] == "video" else None
    video_cols = [f"videos/{video_key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")] if video_key \
        else []
    tasks = task_table(_table(fs, f"{root}/meta/tasks.parquet", uri, "meta/tasks.parquet"), f"{uri}/meta/tasks.parquet")
    sel = pafs.FileSelector(f"{root}/meta/episodes", recursive=True, allow_not_found=True)
    ep_files = sorted(i.path for i in fs.get_file_info(sel) if i.path.endswith(".parquet"))
    if not ep_files:
        raise SourceFormatError(f"{uri}: missing meta/episodes/chunk-*/file-*.parquet")
    eps = pa.concat_tables([_table(fs, p, uri, p[len(root) + 1:]).select(
        [c for c in ("episode_index", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index",
                     "data/file_index", *video_cols) if c in pq.read_schema(p, filesystem=fs).names]) for p in ep_files],
        promote_options="default")
    need = ["episode_index", "length", "dataset_from_index", "data/chunk_index", "data/file_index", *video_cols]
    missing = [c for c in need if c not in eps.column_names]
    if missing:
        raise SourceFormatError(f"{uri}/meta/episodes: missing column(s) {missing}")
    template = info.get("data_path") or "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    episodes: dict[int, dict[str, Any]] = {}
    for row in eps.to_pylist():
        rel = template.format(chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"]))
        episodes[int(row["episode_index"])] = {"length": int(row["length"]), "from_index": int(row["dataset_from_index"]),
                                                "file": rel}
        if video_key:
            vtemplate = info.get("video_path") or "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
            episodes[int(row["episode_index"])]["video"] = {
                "file": vtemplate.format(video_key=video_key, chunk_index=int(row[video_cols[0]]),
                                         file_index=int(row[video_cols[1]])),
                "from_timestamp": float(row[video_cols[2]])}
    if not episodes:
        raise SourceFormatError(f"{uri}: empty dataset (meta/episodes lists no episodes)")
    files = sorted({e["file"] for e in episodes.values()})
    videos = sorted({e["video"]["file"] for e in episodes.values() if "video" in e})
    infos = fs.get_file_info([f"{root}/{f}" for f in files + videos])
    sizes = {}
    for f, i in zip(files + videos, infos):
        if i.type == pafs.FileType.NotFound:
            what = "video" if f in videos else "data"
            raise SourceFormatError(f"{uri}/{f}: {what} file named by meta/episodes is missing")
        sizes[f] = int(i.size)
    return LeRobotDataset(uri=uri, info=info, tasks=tasks, episodes=dict(sorted(episodes.items())), files=files,
                          sizes=sizes)


def _vectors(col: pa.ChunkedArray | pa.Array, key: str, where: str) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col.type, pa.BaseExtensionType):  # Ray's tensor columns
        col = col.storage
    if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type)):
        if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
            return col.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 1)
        raise SourceFormatError(f"{where}: feature {key!r} is {col.type}; expected a vector of numbers")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.min() != lengths.max():
        row = int(np.argmax(lengths != lengths[0]))
        raise SourceFormatError(f"{where}: feature {key!r} has length {lengths[row]} at frame {row}, expected "
                                f"{lengths[0]}")
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)


def _image_bytes(col, key: str, where: str) -> list:
    """Encoded bytes of an image feature: the parquet struct's ``bytes``, or a decoded frame re-encoded."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_struct(col.type):
        return col.field("bytes").to_pylist()
    if pa.types.is_binary(col.type):
        return col.to_pylist()
    frames = col.to_numpy(zero_copy_only=False)  # Ray's decoded uint8 HxWxC tensors
    return [encode_image(np.asarray(f, np.uint8)) for f in frames]


def frames_to_episodes(frames: pa.Table, ds: LeRobotDataset, config: LeRobotConfig, source: str, where: str):
    """Yield (episode_index, step columns, where) for the whole episodes of ``frames``, in order.

    Checks each episode's frames against meta/episodes: every frame there, ``frame_index``
    0..length-1, ``index`` = dataset_from_index + frame_index, a known ``task_index``.
    """
    for c in (*KEY_COLUMNS, config.state_key, config.action_key):
        if c not in frames.column_names:
            raise SourceFormatError(f"{where}: missing column {c!r}; the frames have {frames.column_names}")
    order = pc.sort_indices(frames, sort_keys=[("episode_index", "ascending"), ("frame_index", "ascending")])
    frames = frames.take(order)
    ep = frames.column("episode_index").to_numpy().astype(np.int64)
    fi = frames.column("frame_index").to_numpy().astype(np.int64)
    gi = frames.column("index").to_numpy().astype(np.int64)
    state = _vectors(frames.column(config.state_key), config.state_key, where)
    action = _vectors(frames.column(config.action_key), config.action_key, where)
    if "task" in frames.column_names and pa.types.is_string(frames.column("task").type):
        task = frames.column("task").to_pylist()  # read_lerobot resolves the task string
    elif "task_index" in frames.column_names:
        ti = frames.column("task_index").to_pylist()
        unknown = sorted({t for t in ti if t not in ds.tasks}, key=str)
        if unknown:
            raise SourceFormatError(f"{where}: task_index {unknown[:5]} not in meta/tasks.parquet "
                                    f"(it has {sorted(ds.tasks)[:10]})")
        task = [ds.tasks[t] for t in ti]
    else:
        task = [None] * len(ep)
    reward = frames.column(config.reward_key).to_numpy(zero_copy_only=False).reshape(len(ep), -1)[:, 0] \
        if config.reward_key in frames.column_names else None
    done = frames.column(config.done_key).to_numpy(zero_copy_only=False).reshape(len(ep), -1)[:, 0].astype(bool) \
        if config.done_key in frames.column_names else np.zeros(len(ep), bool)
    image = None
    video = config.image_key and ds.info["features"][config.image_key]["dtype"] == "video"
    if config.image_key and config.image_key in frames.column_names:  # an image feature, or frames Ray decoded
        image = _image_bytes(frames.column(config.image_key), config.image_key, where)
    elif config.image_key and not video:
        raise SourceFormatError(f"{where}: missing image column {config.image_key!r}")
    starts = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(ep)]):
        eid, t = int(ep[s]), int(e - s)
        w = f"{where}, episode_index {eid}"
        meta = ds.episodes.get(eid)
        if meta is None:
            raise SourceFormatError(f"{w}: not listed in meta/episodes")
        if t != meta["length"] or not np.array_equal(fi[s:e], np.arange(t)):
            raise SourceFormatError(f"{w}: column 'frame_index' holds {t} frames {fi[s:e][:5].tolist()}...; expected "
                                    f"0..{meta['length'] - 1} (length {meta['length']} in meta/episodes)")
        if not np.array_equal(gi[s:e], meta["from_index"] + np.arange(t)):
            bad = int(np.argmax(gi[s:e] != meta["from_index"] + np.arange(t)))
            raise SourceFormatError(f"{w}: column 'index' is {int(gi[s + bad])} at frame_index {bad}; expected "
                                    f"dataset_from_index {meta['from_index']} + frame_index")
        first, last = episode_flags(t)
        ep_image = None if image is None else image[s:e]
        if video and image is None:
            ep_image = _video_images(ds, eid, t, w)
        yield eid, {
            "source": source, "episode": np.full(t, eid, np.int64), "step": np.arange(t, dtype=np.int32),
            "task": task[s:e], "state": state[s:e], "action": action[s:e],
            "image": ep_image,
            "reward": None if reward is None else reward[s:e].astype(np.float32),
            "is_first": first, "is_last": last, "is_terminal": done[s:e], "success": None,
        }, w


def _video_images(ds: LeRobotDataset, eid: int, length: int, where: str) -> list[bytes]:
    """The episode's frames of its video camera, at ``from_timestamp + frame_index / fps``."""
    from distcur.sources.video import video_frames

    v = ds.episodes[eid]["video"]
    if not ds.fps:
        raise SourceFormatError(f"{ds.uri}/meta/info.json: no 'fps', needed to find video frames")
    fs, root = resolve(ds.uri)
    with fs.open_input_file(f"{root}/{v['file']}") as f:
        return video_frames(f, v["from_timestamp"] + np.arange(length) / float(ds.fps), float(ds.fps),
                            f"{ds.uri}/{v['file']} ({where})")


def _episode_info(ds: LeRobotDataset, eid: int) -> dict:
    m = ds.episodes[eid]
    return {"episode_index": eid, "from_index": m["from_index"], "length": m["length"], "file": m["file"]}


def ingest_lerobot_file(shard: LeRobotShard, ds: LeRobotDataset, config: LeRobotConfig, source: str, sink: Sink,
                        rows_per_part: int = 100_000) -> ShardResult:
    """Read one data file's frames with pyarrow, convert its episodes and hand the parts to ``sink``."""
    fs, root = resolve(shard.uri)
    where = f"{shard.uri}/{shard.file}"
    frames = _table(fs, f"{root}/{shard.file}", shard.uri, shard.file)
    if frames.num_rows == 0:
        raise SourceFormatError(f"{where}: empty data file")
    writer = PartWriter(sink, shard.index, where, rows_per_part)
    info = {}
    for eid, cols, w in frames_to_episodes(frames, ds, config, source, where):
        writer.add(cols, w)
        info[str(eid)] = _episode_info(ds, eid)
    return writer.result(episode_info=info)


def lerobot_reader_available() -> bool:
    """Whether ``ray.data.read_lerobot`` can run here (it needs the ``lerobot`` package >= 0.5)."""
    try:
        from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata  # noqa: F401
    except ImportError:
        return False
    return True


def convert_frame_batches(batches: Iterable[pa.Table], ds: LeRobotDataset, config: LeRobotConfig, source: str,
                          sink: Sink, rows_per_part: int = 100_000) -> ShardResult:
    """Frames streamed in batches (``ray.data.read_lerobot``'s, any episode order within a batch):
    whole episodes are converted as their last frame arrives and their parts handed to ``sink``."""
    writer = PartWriter(sink, 0, ds.uri, rows_per_part)
    pending: dict[int, list[pa.Table]] = {}
    counts: dict[int, int] = {}
    info = {}
    for batch in batches:
        ep = batch.column("episode_index").to_numpy()
        for eid in np.unique(ep).tolist():
            part = batch.filter(pc.equal(batch.column("episode_index"), eid))
            pending.setdefault(eid, []).append(part)
            counts[eid] = counts.get(eid, 0) + part.num_rows
            if counts[eid] >= ds.episodes.get(eid, {}).get("length", 0):
                table = pa.concat_tables(pending.pop(eid))
                for e, cols, w in frames_to_episodes(table, ds, config, source, f"{ds.uri} (read_lerobot)"):
                    writer.add(cols, w)
                    info[str(e)] = _episode_info(ds, e)
    if pending:
        raise SourceFormatError(f"{ds.uri}: read_lerobot gave incomplete episodes {sorted(pending)[:5]}")
    return writer.result(episode_info=info)


def lerobot_metadata(ds: LeRobotDataset, config: LeRobotConfig, reader: str, results: list[ShardResult]) -> dict:
    """The source's manifest fields besides the merged dims and action statistics; every episode of
    meta/episodes must have had frames."""
    episodes = {k: v for r in results for k, v in r.episode_info.items()}
    missing = sorted(set(map(str, ds.episodes)) - set(episodes), key=int)
    if missing:
        raise SourceFormatError(f"{ds.uri}: episodes {missing[:5]} of meta/episodes have no frames in data/")
    feats = ds.info.get("features", {})
    return {"format": "lerobot", "root": ds.uri, "codebase_version": ds.info.get("codebase_version"),
            "control_frequency": ds.fps, "state_key": config.state_key, "action_key": config.action_key,
            "image_key": config.image_key, "reader": reader,
            "camera_names": sorted(k for k, f in feats.items() if f.get("dtype") in ("image", "video")),
            "total_frames": ds.info.get("total_frames"), "tasks": {str(k): v for k, v in ds.tasks.items()},
            "index_columns": list(KEY_COLUMNS), "episode_info": episodes}
