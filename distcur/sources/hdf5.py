"""robomimic / LIBERO HDF5 demonstrations into the canonical step table (read with h5py).

The layout (robomimic's, which LIBERO shares)::

    data/                         attrs: env_args (JSON: env_name, env_kwargs.control_freq, ...)
                                         problem_info (LIBERO, JSON: language_instruction, ...)
    data/demo_N/obs/<key>         (T, ...) per-step observations; uint8 (T, H, W, 3) are cameras
    data/demo_N/actions           (T, A)
    data/demo_N/rewards, dones    (T,)
    mask/<filter_key>             names of the demos in that filter (b"demo_3", ...)

Mapping: ``state`` = the chosen low-dim obs keys concatenated in the order given (default: every
non-image obs key, sorted), ``action`` = ``actions``, ``reward`` = ``rewards``, ``is_terminal`` =
``dones``, ``task`` = LIBERO's language instruction (else the file name), ``image`` = the first
camera of ``image_keys`` encoded as PNG (or JPEG). Demos are read in order of their number
(demo_9 before demo_10); episode ids count demos across the files in the order given, so they are
stable for the same inputs. The manifest records per episode its file, demo and the masks (filter
keys) it belongs to, so a selection maps back to demos (``distcur select --export-hdf5-mask``).

The unit of work is a shard: one file, or a group of ``demos_per_shard`` of its demos
(:func:`plan_hdf5` plans them, :func:`read_shard` reads one and hands its parts to a sink); the
stage :func:`distcur.stages.ingest.run_hdf5` maps the shards and commits the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from distcur.deps import require
from distcur.fs import resolve
from distcur.sources.common import (
    PartWriter,
    ShardResult,
    Sink,
    SourceFormatError,
    encode_image,
    episode_flags,
)

STAGE = "ingest-hdf5"
IMAGE_FORMATS = ("png", "jpeg")


def _h5py():
    return require("h5py", "distcur ingest hdf5")


@dataclass(frozen=True)
class HDF5Shard:
    """Some demos of one HDF5 file: the unit of one read task."""

    uri: str
    index: int  # position among all shards
    demos: tuple[str, ...]
    first_episode: int  # episode id of demos[0]; the others follow


@dataclass(frozen=True)
class HDF5Config:
    """How a robomimic / LIBERO file's demos map to the step table (see the module docstring)."""

    obs_keys: tuple[str, ...] | None = field(default=None, metadata={
        "help": "obs keys concatenated into state, in this order (default: every non-image obs key, sorted)"})
    action_key: str = field(default="actions", metadata={
        "help": "dataset of each demo holding the actions (default: actions)"})
    image_keys: tuple[str, ...] = field(default=(), metadata={
        "help": "camera obs keys (uint8 HxWx3, e.g. agentview_image); the first is kept, encoded, in image"})
    image_format: str = field(default="png", metadata={"choices": IMAGE_FORMATS})
    filter_key: str | None = field(default=None, metadata={
        "help": "ingest only the demos of mask/<KEY> (e.g. train, 20_percent)"})
    control_frequency: float | None = field(default=None, metadata={
        "help": "Hz (default: env_args' control_freq when the file records it)"})
    task: str | None = field(default=None, metadata={  # overrides the instruction / file name
        "help": "task of every demo (default: LIBERO's problem_info language_instruction, else the file name)"})

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"HDF5Config.image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def demo_number(name: str) -> tuple[int, str]:
    """Sort key of a demo name: its number (demo_9 < demo_10), then the name."""
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else -1, name)


def _local(uri: str) -> str:
    fs, path = resolve(uri)
    if not fs.__class__.__name__.startswith("Local"):
        raise SourceFormatError(f"{uri}: HDF5 files are read from a local or mounted path (h5py needs a file)")
    return path


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json_attr(attrs, name: str, where: str) -> dict | None:
    if name not in attrs:
        return None
    try:
        value = json.loads(_decode(attrs[name]))
    except json.JSONDecodeError as e:
        raise SourceFormatError(f"{where}: attribute data.attrs[{name!r}] is not JSON ({e})") from e
    return value if isinstance(value, dict) else None


def task_from_file_name(path: str) -> str:
    """LIBERO names files after the instruction: KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5 -> 'turn on the stove'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = re.sub(r"_demo$", "", stem)
    words = stem.split("_")
    while len(words) > 1 and words[0].isupper():  # the scene prefix
        words = words[1:]
    return " ".join(words)


@dataclass
class HDF5File:
    """What the driver reads of one file to plan its shards (no step data)."""

    uri: str
    demos: list[str]  # selected demos, in demo-number order
    masks: dict[str, list[str]]  # filter key -> demo names
    obs_keys: list[str]  # low-dim obs keys of the first demo
    image_keys: list[str]  # camera obs keys of the first demo
    task: str
    control_frequency: float | None
    env_name: str | None
    size: int


def open_hdf5(uri: str, config: HDF5Config) -> HDF5File:
    """List one file's demos, masks and obs keys; errors name the file and what is missing."""
    h5py = _h5py()
    path = _local(uri)
    if not os.path.exists(path):
        raise SourceFormatError(f"{uri}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SourceFormatError(f"{uri}: not a readable HDF5 file ({e})") from e
    with f, damaged_hdf5(uri):
        if "data" not in f:
            raise SourceFormatError(f"{uri}: no 'data' group: expected robomimic/LIBERO layout data/demo_N/...")
        data = f["data"]
        demos = sorted((k for k in data.keys() if isinstance(data[k], h5py.Group)), key=demo_number)
        if not demos:
            raise SourceFormatError(f"{uri}: empty file: 'data' holds no demos (expected data/demo_0, ...)")
        masks = {}
        if "mask" in f:
            for k in f["mask"].keys():
                masks[k] = sorted((_decode(v) for v in f["mask"][k][()]), key=demo_number)
        if config.filter_key is not None:
            if config.filter_key not in masks:
                raise SourceFormatError(f"{uri}: no filter key mask/{config.filter_key!r}; "
                                        f"the file has masks {sorted(masks)}")
            wanted = set(masks[config.filter_key])
            unknown = sorted(wanted - set(demos), key=demo_number)
            if unknown:
                raise SourceFormatError(f"{uri}: mask/{config.filter_key} names demos {unknown[:5]} not in data/")
            demos = [d for d in demos if d in wanted]
            if not demos:
                raise SourceFormatError(f"{uri}: mask/{config.filter_key} is empty: no demos to ingest")
        first = data[demos[0]]
        where = f"{uri}, demo {demos[0]!r}"
        if "obs" not in first:
            raise SourceFormatError(f"{where}: missing key 'obs'")
        obs = first["obs"]
        image_keys = sorted(k for k in obs.keys() if _is_image(obs[k]))
        obs_keys = sorted(k for k in obs.keys() if k not in image_keys)
        problem = _json_attr(data.attrs, "problem_info", uri) or {}
        env_args = _json_attr(data.attrs, "env_args", uri) or {}
        freq = config.control_frequency
        if freq is None:
            freq = (env_args.get("env_kwargs") or {}).get("control_freq")
        task = config.task or problem.get("language_instruction") or task_from_file_name(uri)
        return HDF5File(uri=uri, demos=demos, masks=masks, obs_keys=obs_keys, image_keys=image_keys,
                        task=str(task).strip(), control_frequency=None if freq is None else float(freq),
                        env_name=env_args.get("env_name"), size=os.path.getsize(path))


@contextlib.contextmanager
def damaged_hdf5(where: str):
    """h5py's errors on a damaged file (cut short, a header overwritten) as one naming ``where``."""
    from distcur.schema import StepValidationError

    try:
        yield
    except (SourceFormatError, StepValidationError):  # already a clear message
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise SourceFormatError(f"{where}: damaged HDF5 file ({type(e).__name__}: {e})") from e


def _is_image(dataset) -> bool:
    return dataset.dtype == np.uint8 and dataset.ndim == 4 and dataset.shape[-1] in (1, 3, 4)


def _array(group, key: str, where: str, t: int | None = None, ndim: tuple[int, ...] = (1, 2)) -> np.ndarray:
    if key not in group:
        raise SourceFormatError(f"{where}: missing key {key!r}; it has {sorted(group.keys())}")
    arr = group[key][()]
    if arr.dtype.kind not in "fiub" or arr.ndim not in ndim:
        raise SourceFormatError(f"{where}: key {key!r} has shape {arr.shape} dtype {arr.dtype}; expected a numeric "
                                f"array of {' or '.join(map(str, ndim))} dims (steps first)")
    if t is not None and arr.shape[0] != t:
        raise SourceFormatError(f"{where}: key {key!r} has {arr.shape[0]} steps but {t} actions")
    return arr


def demo_columns(demo, config: HDF5Config, obs_keys: list[str], source: str, episode: int, task: str,
                 where: str, keys_from: str = "the first demo") -> dict[str, Any]:
    """Step-table columns of one demo group (state from ``obs_keys``, first camera encoded)."""
    action = _array(demo, config.action_key, where, ndim=(1, 2))
    t = len(action)
    if t == 0:
        raise SourceFormatError(f"{where}: key {config.action_key!r} has 0 steps (empty demo)")
    if "obs" not in demo:
        raise SourceFormatError(f"{where}: missing key 'obs'")
    obs = demo["obs"]
    if config.obs_keys is None:  # keys inferred from the first demo: every demo must have the same ones
        low_dim = sorted(k for k in obs.keys() if not _is_image(obs[k]))
        if low_dim != sorted(obs_keys):
            raise SourceFormatError(
                f"{where}: obs keys {low_dim} differ from {sorted(obs_keys)}, those of {keys_from} (the state's "
                f"default columns); name the keys every demo has with --obs-keys")
    parts = []
    for k in obs_keys:
        arr = _array(obs, k, f"{where}, obs", t, ndim=(1, 2, 3))
        parts.append(arr.reshape(t, -1).astype(np.float32))
    state = np.concatenate(parts, axis=1)
    image = None
    if config.image_keys:
        cam = config.image_keys[0]
        if cam not in obs:
            raise SourceFormatError(f"{where}: missing camera key 'obs/{cam}'; obs keys are {sorted(obs.keys())}")
        frames = obs[cam][()]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != t:
            raise SourceFormatError(f"{where}: camera 'obs/{cam}' has shape {frames.shape} dtype {frames.dtype}; "
                                    f"expected uint8 ({t}, H, W, 3)")
        image = [encode_image(fr, config.image_format) for fr in frames]
    reward = _array(demo, "rewards", where, t, ndim=(1,)).astype(np.float32) if "rewards" in demo else None
    dones = _array(demo, "dones", where, t, ndim=(1,)).astype(bool) if "dones" in demo else np.zeros(t, bool)
    is_first, is_last = episode_flags(t)
    return {
        "source": source, "episode": np.full(t, episode, np.int64), "step": np.arange(t, dtype=np.int32),
        "task": [task] * t, "state": state, "action": action.reshape(t, -1).astype(np.float32), "image": image,
        "reward": reward, "is_first": is_first, "is_last": is_last, "is_terminal": dones, "success": None,
    }


def ingest_hdf5_shard(shard: HDF5Shard, config: HDF5Config, obs_keys: list[str], task: str, masks: dict,
                      source: str, sink: Sink, rows_per_part: int = 100_000,
                      keys_from: str = "the first demo") -> ShardResult:
    """Read, convert and validate the demos of one shard, handing its parts to ``sink``; returns
    its parts and per-episode facts."""
    h5py = _h5py()
    writer = PartWriter(sink, shard.index, shard.uri, rows_per_part)
    info: dict[str, Any] = {}
    try:
        f = h5py.File(_local(shard.uri), "r")
    except OSError as e:
        raise SourceFormatError(f"{shard.uri}: not a readable HDF5 file ({e})") from e
    with f:
        for j, name in enumerate(shard.demos):
            eid = shard.first_episode + j
            where = f"{shard.uri}, demo {name!r} (episode {eid})"
            with damaged_hdf5(where):
                present = name in f["data"]
            if not present:
                raise SourceFormatError(f"{where}: missing group data/{name}")
            with damaged_hdf5(where):
                cols = demo_columns(f["data"][name], config, obs_keys, source, eid, task, where, keys_from)
            writer.add(cols, where)
            info[str(eid)] = {"file": shard.uri, "demo": name, "steps": len(cols["episode"]),
                              "groups": sorted(k for k, names in masks.items() if name in names)}
    return writer.result(episode_info=info)


def plan_shards(files: list[HDF5File], demos_per_shard: int | None = None) -> list[HDF5Shard]:
    """Shards of whole files (or groups of ``demos_per_shard`` demos) with their first episode ids."""
    shards, next_episode = [], 0
    for f in files:
        step = demos_per_shard or len(f.demos)
        for start in range(0, len(f.demos), step):
            demos = tuple(f.demos[start:start + step])
            shards.append(HDF5Shard(uri=f.uri, index=len(shards), demos=demos, first_episode=next_episode))
            next_episode += len(demos)
    return shards


@dataclass
class HDF5Plan:
    """The files of one ingest, the obs keys that make the state, and the shards."""

    uris: list[str]
    files: list[HDF5File]
    obs_keys: list[str]
    shards: list[HDF5Shard] = field(default_factory=list)

    @property
    def keys_from(self) -> str:
        return f"{self.files[0].uri}, demo {self.files[0].demos[0]!r}"

    def identity(self) -> dict:
        """Identity of the input files (what the stage fingerprints): their sizes."""
        return {"files": {f.uri: f.size for f in self.files}}


def plan_hdf5(paths: list[str], config: HDF5Config, demos_per_shard: int | None = None) -> HDF5Plan:
    """Open every file (its demos, masks and obs keys), check the state's obs keys, plan the shards."""
    if not paths:
        raise SourceFormatError("ingest hdf5: no files given")
    uris = [str(p) if "://" in str(p) else os.path.abspath(str(p)) for p in paths]
    files = [open_hdf5(u, config) for u in uris]
    obs_keys = list(config.obs_keys) if config.obs_keys is not None else files[0].obs_keys
    if not obs_keys:
        raise SourceFormatError(f"{files[0].uri}: no low-dim obs keys to build state from; name them with --obs-keys")
    for f in files:
        cams = [k for k in obs_keys if k in f.image_keys]
        if cams:
            raise SourceFormatError(f"{f.uri}: obs key(s) {cams} are camera images (uint8 HxWx3), not state; "
                                    "pass them with --image-keys")
    return HDF5Plan(uris=uris, files=files, obs_keys=obs_keys, shards=plan_shards(files, demos_per_shard))


def read_shard(shard: HDF5Shard, plan: HDF5Plan, config: HDF5Config, source: str, sink: Sink,
               rows_per_part: int = 100_000) -> ShardResult:
    """One shard of ``plan`` (the task an executor maps over ``plan.shards``)."""
    f = next(f for f in plan.files if f.uri == shard.uri)
    return ingest_hdf5_shard(shard, config, plan.obs_keys, f.task, f.masks, source, sink, rows_per_part,
                             plan.keys_from)


def hdf5_metadata(plan: HDF5Plan, config: HDF5Config, results: list[ShardResult]) -> dict:
    """The source's manifest fields besides the merged dims and action statistics."""
    files = plan.files
    episodes = {k: v for r in results for k, v in r.episode_info.items()}
    freqs = sorted({f.control_frequency for f in files if f.control_frequency is not None})
    return {
        "format": "hdf5", "files": plan.uris, "obs_keys": plan.obs_keys, "action_key": config.action_key,
        "camera_names": sorted({k for f in files for k in f.image_keys}),
        "image_key": config.image_keys[0] if config.image_keys else None,
        "filter_key": config.filter_key,
        "control_frequency": freqs[0] if len(freqs) == 1 else (freqs or None),
        "tasks": sorted({f.task for f in files}), "env_names": sorted({f.env_name for f in files if f.env_name}),
        "masks": {f.uri: sorted(f.masks) for f in files},
        "episode_info": episodes,
    }


def write_mask_copy(src_uri: str, dst_path: str, key: str, demos: list[str]) -> None:
    """Copy an HDF5 file to ``dst_path`` (a local path) and write ``mask/<key>`` = ``demos`` into the copy.

    The original is only read. An existing ``mask/<key>`` of the copy is replaced.
    """
    import shutil

    h5py = _h5py()
    src = _local(src_uri)
    if os.path.abspath(src) == os.path.abspath(dst_path):
        raise ValueError(f"export: refusing to write a mask into the original {src_uri}")
    os.makedirs(os.path.dirname(dst_path) or ".", exist_ok=True)
    tmp = f"{dst_path}.tmp"
    shutil.copyfile(src, tmp)
    with h5py.File(tmp, "r+") as f:
        mask = f.require_group("mask")
        if key in mask:
            del mask[key]
        mask.create_dataset(key, data=np.array(sorted(demos, key=demo_number), dtype="S"))
    os.replace(tmp, dst_path)
