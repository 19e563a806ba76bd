"""Read TFDS RLDS datasets (Open X-Embodiment) into the canonical step table, without TensorFlow.

A TFDS dataset directory (local or ``s3://``) holds ``dataset_info.json``, ``features.json``
and shard files ``<name>-<split>.<tfrecord|array_record>-XXXXX-of-YYYYY``; each record is one
serialized episode whose ``steps`` are a nested sequence feature. This module

- reads the feature spec from ``features.json`` with TFDS's feature classes (no TF needed),
- reads records itself: TFRecord framing (length + masked CRC32C, checked) over pyarrow.fs,
  or array_record's C++ reader,
- parses each record with TFDS's numpy example parser (``ExampleParserNp``) and keeps images
  as the encoded bytes stored,
- maps the dataset's keys to the step table with an :class:`~distcur.sources.rlds_configs.RLDSConfig`,
- validates every part with :func:`distcur.schema.validate_steps` (errors name file, episode,
  step and column) and writes it under the store writer's data dir.

The unit of work is one shard file (:func:`ingest_shard`, which hands each validated part to a
``sink``); the stage (:func:`distcur.stages.ingest.run_rlds`) plans the shards with
:func:`open_rlds_dataset`, maps ``ingest_shard`` over them with an executor (sequential, or Ray
Data in :mod:`distcur.distributed.ingest`) and commits the table with one manifest. Memory per
worker is bounded by one part (``rows_per_part`` / ``bytes_per_part``), never a whole shard or
dataset.

Episode ids are the episode's position in the dataset (splits in the order asked, shards in
order, records in file order), from the shard lengths in ``dataset_info.json``: deterministic,
unique within the source, and the same however the dataset is sharded. When shard lengths are
missing the id is ``shard_index * 2**32 + index_in_shard``.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from distcur.fs import resolve
from distcur.schema import StepValidationError, steps_table, validate_steps
from distcur.sources.rlds_configs import RLDSConfig

STAGE = "ingest-rlds"
FILE_FORMATS = {"tfrecord": "tfrecord", "array_record": "array_record"}
SHARD_ID_BITS = 32
PART_NAME = "part-{shard:05d}-{chunk:04d}.parquet"
DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_TFRECORD_HEADER = struct.Struct("<QI")
_CRC_MASK_DELTA = 0xA282EAD8


class RLDSFormatError(ValueError):
    """An RLDS dataset that cannot be read; the message names the file, record/episode and key."""


# -- the dataset and its shards ------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One shard file of an RLDS dataset: the unit of one read task."""

    dataset_uri: str
    file_name: str
    file_format: str
    split: str
    index: int  # position among the shards being read (all splits)
    first_episode: int | None  # global id of its first episode (None: shard lengths unknown)
    num_episodes: int | None  # from dataset_info.json, checked against the file

    @property
    def uri(self) -> str:
        return f"{self.dataset_uri.rstrip('/')}/{self.file_name}"

    def episode_id(self, index_in_shard: int) -> int:
        if self.first_episode is None:
            return (self.index << SHARD_ID_BITS) + index_in_shard
        return self.first_episode + index_in_shard


@dataclass
class RLDSDataset:
    """A TFDS dataset directory: its metadata and the shards of the splits asked for."""

    uri: str
    name: str
    version: str
    file_format: str
    features_json: dict
    dataset_info: dict
    shards: list[Shard]
    file_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def num_episodes(self) -> int | None:
        counts = [s.num_episodes for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)

    def identity(self) -> dict:
        """Identity of the input data (what the stage fingerprints): its metadata and shard files
        with their sizes."""
        return {"dataset_info": self.dataset_info, "files": self.file_sizes}


def _read_json(fs: pafs.FileSystem, path: str, uri: str) -> dict:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        raise RLDSFormatError(f"{uri} does not exist: not a TFDS dataset directory") from None
    except OSError as e:
        if "NoSuchKey" in str(e) or "does not exist" in str(e):
            raise RLDSFormatError(f"{uri} does not exist: not a TFDS dataset directory") from None
        raise
    except json.JSONDecodeError as e:
        raise RLDSFormatError(f"{uri} is not valid JSON: {e}") from e


def _shard_name(template: str, name: str, split: str, file_format: str, index: int, count: int) -> str:
    return (
        template.replace("{DATASET}", name)
        .replace("{SPLIT}", split)
        .replace("{FILEFORMAT}", file_format)
        .replace("{SHARD_X_OF_Y}", f"{index:05d}-of-{count:05d}")
        .replace("{SHARD_INDEX}", f"{index:05d}")
        .replace("{NUM_SHARDS}", f"{count:05d}")
    )


def open_rlds_dataset(uri: str, splits: Iterable[str] = ("train",)) -> RLDSDataset:
    """Read ``dataset_info.json`` and ``features.json`` of a TFDS dataset dir and list its shards.

    Raises :class:`RLDSFormatError` for a missing directory, an unknown split, a missing shard
    file, or a dataset without episodes.
    """
    uri = str(uri).rstrip("/")
    fs, root = resolve(uri)
    info = _read_json(fs, f"{root}/dataset_info.json", f"{uri}/dataset_info.json")
    features_json = _read_json(fs, f"{root}/features.json", f"{uri}/features.json")
    name = info.get("name") or os.path.basename(os.path.dirname(root))
    file_format = info.get("fileFormat", "tfrecord")
    if file_format not in FILE_FORMATS:
        raise RLDSFormatError(f"{uri}: file format {file_format!r} is not supported; expected one of {list(FILE_FORMATS)}")
    by_split = {s["name"]: s for s in info.get("splits", [])}
    shards: list[Shard] = []
    next_episode: int | None = 0
    for split in splits:
        if split not in by_split:
            raise RLDSFormatError(f"{uri}: no split {split!r}; the dataset has splits {sorted(by_split)}")
        s = by_split[split]
        lengths = [int(n) for n in s.get("shardLengths", [])]
        num_shards = len(lengths) or int(s.get("numShards", 0))
        template = s.get("filepathTemplate") or DEFAULT_TEMPLATE
        for i in range(num_shards):
            n = lengths[i] if lengths else None
            shards.append(
                Shard(
                    dataset_uri=uri,
                    file_name=_shard_name(template, name, split, file_format, i, num_shards),
                    file_format=file_format,
                    split=split,
                    index=len(shards),
                    first_episode=next_episode if n is not None else None,
                    num_episodes=n,
                )
            )
            next_episode = None if n is None or next_episode is None else next_episode + n
    if not shards:
        raise RLDSFormatError(f"{uri}: dataset is empty (no shard files in splits {list(splits)})")
    infos = fs.get_file_info([f"{root}/{s.file_name}" for s in shards])
    sizes = {}
    for shard, fi in zip(shards, infos):
        if fi.type == pafs.FileType.NotFound:
            raise RLDSFormatError(f"{shard.uri}: shard file listed in dataset_info.json is missing")
        sizes[shard.file_name] = int(fi.size)
    dataset = RLDSDataset(
        uri=uri, name=name, version=str(info.get("version", "")), file_format=file_format,
        features_json=features_json, dataset_info=info, shards=shards, file_sizes=sizes,
    )
    if dataset.num_episodes == 0:
        raise RLDSFormatError(f"{uri}: dataset is empty (0 episodes in splits {list(splits)})")
    return dataset


# -- features and parsing (TFDS's numpy parser; no TensorFlow) -----------------------------------


@functools.lru_cache(maxsize=8)
def _parser_and_keys(features_blob: str) -> tuple[Any, tuple[str, ...]]:
    """TFDS's numpy example parser for a features.json, and the flat step feature paths."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import example_parser
    from tensorflow_datasets.core.utils import py_utils

    features = tfds.features.FeatureConnector.from_json(json.loads(features_blob))
    spec = features.get_serialized_info()
    flat = py_utils.flatten_nest_dict(spec)
    step_keys = tuple(sorted(k[len("steps/"):] for k in flat if k.startswith("steps/")))
    return example_parser.ExampleParserNp(spec), step_keys


def step_feature_keys(features_json: dict) -> tuple[str, ...]:
    """Flat paths of the features of one step (e.g. ``observation/image``)."""
    return _parser_and_keys(json.dumps(features_json, sort_keys=True))[1]


def check_config(dataset: RLDSDataset, config: RLDSConfig) -> None:
    """Fail early, before any work, when the config reads a step feature the dataset lacks."""
    keys = set(step_feature_keys(dataset.features_json))
    if not keys:
        raise RLDSFormatError(f"{dataset.uri}/features.json: no 'steps' feature: not an RLDS dataset")
    missing = [k for k in config.required_keys if k not in keys]
    groups = [k for k in missing if k in _prefixes(keys)]
    if groups:
        k = groups[0]
        leaves = sorted(x for x in keys if x.startswith(k + "/"))
        raise RLDSFormatError(
            f"{dataset.uri}: config {config.name!r} reads step feature {k!r}, which is a dict of {leaves}; "
            "name its leaves in the order to concatenate (e.g. action/world_vector, action/rotation_delta, ...)"
        )
    if missing:
        raise RLDSFormatError(
            f"{dataset.uri}: config {config.name!r} reads step feature(s) {missing} that features.json "
            f"does not have; the dataset's step features are {sorted(keys)}"
        )


def _prefixes(keys: Iterable[str]) -> set[str]:
    out = set()
    for k in keys:
        parts = k.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _masked_crc(data: bytes | memoryview) -> int:
    import google_crc32c

    crc = google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def iter_tfrecord(stream, name: str) -> Iterator[bytes]:
    """Records of a TFRecord stream, checking framing and both CRCs; errors name file and record."""
    index = 0
    offset = 0
    while True:
        header = stream.read(_TFRECORD_HEADER.size)
        if not header:
            return
        if len(header) < _TFRECORD_HEADER.size:
            raise RLDSFormatError(f"{name}: truncated record {index} at byte {offset} (incomplete header)")
        length, length_crc = _TFRECORD_HEADER.unpack(header)
        if _masked_crc(header[:8]) != length_crc:
            raise RLDSFormatError(f"{name}: corrupt record {index} at byte {offset} (length checksum mismatch)")
        body = stream.read(length + 4)
        if len(body) < length + 4:
            raise RLDSFormatError(
                f"{name}: truncated record {index} at byte {offset} (expected {length} bytes, file ends)"
            )
        data = body[:length]
        (data_crc,) = struct.unpack("<I", body[length:])
        if _masked_crc(data) != data_crc:
            raise RLDSFormatError(f"{name}: corrupt record {index} at byte {offset} (data checksum mismatch)")
        yield data
        index += 1
        offset += _TFRECORD_HEADER.size + length + 4


def iter_array_record(path: str, name: str, batch: int = 16) -> Iterator[bytes]:
    """Records of a local array_record file, read ``batch`` at a time."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path, "readahead_buffer_size:0")
    except Exception as e:  # the C++ reader raises RuntimeError/ValueError on a bad file
        raise RLDSFormatError(f"{name}: cannot open array_record file ({type(e).__name__}: {e})") from e
    ok = False
    try:
        n = reader.num_records()
        for start in range(0, n, batch):
            try:
                records = reader.read(start, min(start + batch, n))
            except Exception as e:
                raise RLDSFormatError(
                    f"{name}: corrupt records {start}..{min(start + batch, n) - 1} ({type(e).__name__}: {e})"
                ) from e
            yield from records
        ok = True
    finally:
        try:
            reader.close()
        except Exception as e:  # the reader re-reports a corruption on close; keep the first error
            if ok:
                raise RLDSFormatError(f"{name}: corrupt array_record file ({type(e).__name__}: {e})") from e


def iter_shard_records(shard: Shard) -> Iterator[bytes]:
    """Serialized episodes of one shard file, streaming (local or S3)."""
    fs, path = resolve(shard.uri)
    if shard.file_format == "tfrecord":
        with fs.open_input_stream(path, buffer_size=1 << 20) as f:
            yield from iter_tfrecord(f, shard.uri)
        return
    if isinstance(fs, pafs.LocalFileSystem):
        yield from iter_array_record(path, shard.uri)
        return
    # array_record's reader wants a local file: stream the shard to a temp file first.
    with tempfile.TemporaryDirectory(prefix="distcur-rlds-") as tmp:
        local = os.path.join(tmp, shard.file_name)
        with fs.open_input_stream(path, buffer_size=1 << 20) as src, open(local, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        yield from iter_array_record(local, shard.uri)


# -- one episode -> step columns -----------------------------------------------------------------


def _lookup(steps: dict, key: str, where: str) -> Any:
    node: Any = steps
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise RLDSFormatError(f"{where}: missing key 'steps/{key}' in the record")
        node = node[part]
    return node


def _matrix(value: Any, key: str, num_steps: int, where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object or arr.shape[:1] != (num_steps,):
        raise RLDSFormatError(
            f"{where}: key 'steps/{key}' has shape {arr.shape} dtype {arr.dtype}; expected {num_steps} numeric rows"
        )
    return arr.reshape(num_steps, -1).astype(np.float32)


def _decode_language(value: Any, encoding: str, num_steps: int, key: str, where: str) -> list[str]:
    arr = np.asarray(value)
    if arr.shape[:1] != (num_steps,):
        raise RLDSFormatError(f"{where}: key 'steps/{key}' has shape {arr.shape}; expected {num_steps} rows")
    if encoding == "codepoints":
        return ["".join(chr(int(c)) for c in row if c) for row in arr.reshape(num_steps, -1)]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr]


def episode_columns(
    example: dict, config: RLDSConfig, source: str, episode: int, where: str
) -> dict[str, Any] | None:
    """Step-table columns of one parsed RLDS episode (None for an episode with no steps).

    ``where`` names the file and episode for errors. State/action are (T, d) float32 in the
    config's documented key order; images stay encoded bytes.
    """
    steps = example.get("steps") if isinstance(example, dict) else None
    if not isinstance(steps, dict):
        raise RLDSFormatError(f"{where}: record has no 'steps' feature")
    is_first = np.asarray(_lookup(steps, "is_first", where), bool)
    t = len(is_first)
    if t == 0:
        return None
    state = np.concatenate([_matrix(_lookup(steps, k, where), k, t, where) for k in config.state_keys], axis=1)
    action = np.concatenate([_matrix(_lookup(steps, k, where), k, t, where) for k in config.action_keys], axis=1)
    for column, arr, keys, expected in (
        ("state", state, config.state_keys, config.state_dim),
        ("action", action, config.action_keys, config.action_dim),
    ):
        if expected is not None and arr.shape[1] != expected:
            widths = {k: _matrix(_lookup(steps, k, where), k, t, where).shape[1] for k in keys}
            raise RLDSFormatError(
                f"{where}, column {column!r}: dim {arr.shape[1]} from {widths}, but config {config.name!r} "
                f"expects {expected}"
            )
    if config.language_key:
        task = _decode_language(_lookup(steps, config.language_key, where), config.language_encoding, t,
                                config.language_key, where)
    else:
        task = [config.default_task] * t
    image = None
    if config.image_keys:
        image = list(np.asarray(_lookup(steps, config.image_keys[0], where), dtype=object))
    reward = None
    if config.reward_key:
        reward = _matrix(_lookup(steps, config.reward_key, where), config.reward_key, t, where)[:, 0]
    return {
        "source": [source] * t,
        "episode": np.full(t, episode, np.int64),
        "step": np.arange(t, dtype=np.int32),
        "task": task,
        "state": state,
        "action": action,
        "image": image,
        "reward": reward,
        "is_first": is_first,
        "is_last": np.asarray(_lookup(steps, "is_last", where), bool),
        "is_terminal": np.asarray(_lookup(steps, "is_terminal", where), bool),
        "success": None if config.success is None else np.full(t, config.success),
    }


def _concat(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in chunks[0]:
        values = [c[name] for c in chunks]
        if values[0] is None:
            out[name] = None
        elif isinstance(values[0], np.ndarray):
            out[name] = np.concatenate(values)
        else:
            out[name] = [v for vs in values for v in vs]
    return out


# -- per-part statistics (merged on the driver into the manifest metadata) -----------------------


def part_stats(state: np.ndarray, action: np.ndarray, episodes: int) -> dict[str, Any]:
    """Sufficient statistics of one part: dims, counts, action sum/sum of squares/min/max."""
    a = action.astype(np.float64)
    return {
        "state_dim": int(state.shape[1]),
        "action_dim": int(action.shape[1]),
        "steps": int(len(action)),
        "episodes": int(episodes),
        "action_sum": a.sum(0).tolist(),
        "action_sumsq": (a * a).sum(0).tolist(),
        "action_min": a.min(0).tolist(),
        "action_max": a.max(0).tolist(),
    }


def merge_stats(stats: list[dict[str, Any]], where: list[str]) -> dict[str, Any]:
    """Merge part statistics into the fields of :func:`distcur.schema.source_metadata`.

    Raises when parts disagree on state or action dims (naming the first disagreeing part).
    """
    first = stats[0]
    for s, w in zip(stats, where):
        for dim in ("state_dim", "action_dim"):
            if s[dim] != first[dim]:
                raise StepValidationError(
                    f"{w}: {dim} {s[dim]} differs from {first[dim]} in {where[0]} (inconsistent dims within a source)"
                )
    n = sum(s["steps"] for s in stats)
    total = np.sum([s["action_sum"] for s in stats], axis=0)
    sumsq = np.sum([s["action_sumsq"] for s in stats], axis=0)
    mean = total / n
    std = np.sqrt(np.maximum(sumsq / n - mean * mean, 0.0))
    return {
        "state_dim": first["state_dim"],
        "action_dim": first["action_dim"],
        "steps": int(n),
        "episodes": int(sum(s["episodes"] for s in stats)),
        "action_mean": np.round(mean, 6).tolist(),
        "action_std": np.round(std, 6).tolist(),
        "action_min": np.min([s["action_min"] for s in stats], axis=0).astype(np.float32).tolist(),
        "action_max": np.max([s["action_max"] for s in stats], axis=0).astype(np.float32).tolist(),
    }


# -- one shard -> parts -------------------------------------------------------------


@dataclass
class ShardResult:
    """What one read task wrote: its parts (relative to the store root) and their statistics."""

    shard: int
    uri: str
    files: list[str]
    rows: int
    episodes: int
    empty_episodes: int
    stats: list[dict[str, Any]]
    tensorflow_loaded: bool  # whether the process that read the shard had TensorFlow imported
    wall_s: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardResult:
        return cls(**json.loads(text))


def ingest_shard(
    shard: Shard,
    features_json: dict,
    config: RLDSConfig,
    source: str,
    sink: Callable[[str, pa.Table], str],
    rows_per_part: int = 100_000,
    bytes_per_part: int = 64 << 20,
) -> ShardResult:
    """Read one shard, convert and validate its episodes, and hand each part to
    ``sink(part name, table) -> path``.

    Memory is bounded by one part: parts are flushed every ``rows_per_part`` steps or
    ``bytes_per_part`` bytes of images, whichever comes first.
    """
    import sys

    t0 = time.time()
    parser, _ = _parser_and_keys(json.dumps(features_json, sort_keys=True))
    files: list[str] = []
    stats: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    pending_rows = pending_bytes = pending_episodes = 0
    rows = episodes = empty = 0

    def flush() -> None:
        nonlocal pending, pending_rows, pending_bytes, pending_episodes, rows
        if not pending:
            return
        cols = _concat(pending)
        origin = f"{shard.uri} (episodes {int(cols['episode'][0])}..{int(cols['episode'][-1])})"
        table = validate_steps(steps_table(cols), origin=origin)
        files.append(sink(PART_NAME.format(shard=shard.index, chunk=len(files)), table))
        stats.append(part_stats(cols["state"], cols["action"], pending_episodes))
        rows += table.num_rows
        pending, pending_rows, pending_bytes, pending_episodes = [], 0, 0, 0

    count = 0
    for count, record in enumerate(iter_shard_records(shard), start=1):
        j = count - 1
        eid = shard.episode_id(j)
        where = f"{shard.uri}, record {j} (episode {eid})"
        try:
            example = parser.parse_example(record)
        except Exception as e:  # protobuf DecodeError, KeyError, ValueError from the TFDS parser
            raise RLDSFormatError(f"{where}: cannot parse the record ({type(e).__name__}: {e})") from e
        cols = episode_columns(example, config, source, eid, where)
        if cols is None:
            empty += 1
            continue
        pending.append(cols)
        pending_rows += len(cols["episode"])
        pending_bytes += sum(len(b) for b in cols["image"]) if cols["image"] is not None else 0
        pending_episodes += 1
        episodes += 1
        if pending_rows >= rows_per_part or pending_bytes >= bytes_per_part:
            flush()
    flush()
    if shard.num_episodes is not None and count != shard.num_episodes:
        raise RLDSFormatError(
            f"{shard.uri}: holds {count} records but dataset_info.json lists {shard.num_episodes} (truncated shard?)"
        )
    return ShardResult(
        shard=shard.index, uri=shard.uri, files=files, rows=rows, episodes=episodes, empty_episodes=empty,
        stats=stats, tensorflow_loaded="tensorflow" in sys.modules, wall_s=round(time.time() - t0, 3),
    )
