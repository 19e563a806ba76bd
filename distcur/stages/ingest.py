"""The ingest stage: a source's canonical step table into ``steps/source=<name>``.

One config dataclass and one ``run_<source>(store, config, executor=None)`` per source. The
readers (:mod:`distcur.sources`) plan a source's shards and turn one shard into validated parts
handed to a sink; here the sink writes them under the store writer's data dir
(:class:`PartSink`), the executor maps the read task over the shards, and the parts of all
shards are committed as one table through :func:`distcur.stages.output.commit_output` (skipped
when the committed manifest matches the config and the input fingerprint; any error deletes the
partial parts and the previous table stays what readers see).

Executors: for RLDS, HDF5, Parquet and LeRobot ``None`` reads the shards in this process
(:func:`distcur.sources.common.map_sequential`); the CLI passes the Ray Data one
(:class:`distcur.distributed.ingest.RayDataShards`), which gets the source's user-error types to
re-raise. MetaWorld generation runs on Ray tasks by default
(:class:`distcur.distributed.tasks.RayTasks`); any ``executor(fn, items) -> list`` will do,
e.g. ``functools.partial(map_sequential, progress=False)``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from distcur.data import heldout_source, steps_key, target_source
from distcur.deps import MissingDependencyError
from distcur.envs.generation import MetaWorldPriorConfig
from distcur.envs.metaworld import use_headless_gl
from distcur.schema import STEP_SCHEMA, StepValidationError
from distcur.sources import hdf5, lerobot, parquet, rlds
from distcur.sources import metaworld as mw
from distcur.sources.common import SourceFormatError, map_sequential
from distcur.sources.rlds_configs import LANGUAGE_ENCODINGS, RLDSConfig, config_from_keys, get_config
from distcur.stages.output import commit_output, commit_table
from distcur.store import Manifest, Store, fingerprint

log = logging.getLogger(__name__)
# the input errors each reader raises, naming file/episode/column: an executor re-raises them as they are
RLDS_ERRORS = (rlds.RLDSFormatError, StepValidationError)
FILE_ERRORS = (SourceFormatError, StepValidationError, MissingDependencyError)
LEROBOT_READERS = ("auto", "ray-lerobot", "files")
HELDOUT_STAGE = "ingest-heldout"


@dataclass
class IngestResult:
    """The committed table (its manifest) and whether this run skipped it as already done."""

    key: str
    manifest: Manifest
    skipped: bool
    shard_results: list = field(default_factory=list)


@dataclass(frozen=True)
class PartSink:
    """Where a read task's parts go: ``sink(name, table)`` writes ``<data_dir>/<name>`` to the
    store and returns that path (picklable: a Ray Data task carries it)."""

    store: Store
    data_dir: str

    def __call__(self, name: str, table: pa.Table) -> str:
        rel = f"{self.data_dir}/{name}"
        self.store.write_parquet(rel, table)
        return rel


def commit_shards(
    store: Store,
    source: str,
    stage: str,
    stage_config: dict,
    inputs: dict[str, str],
    shards: list,
    make_task: Callable[[PartSink], Callable[[Any], Any]],
    metadata: Callable[[list], dict],
    executor: Callable | None = None,
    errors: tuple[type, ...] = FILE_ERRORS,
    force: bool = False,
    progress: bool = True,
    empty_error: Exception | None = None,
) -> IngestResult:
    """Skip when current; else map ``make_task(sink)`` over the shards on ``executor`` and commit
    ``steps/source=<source>``.

    ``metadata(results)`` returns the source's manifest fields besides the merged dims and action
    statistics (file/demo per episode, keys, control frequency, ...); ``empty_error`` is raised
    when no shard held a step.
    """
    key = steps_key(source)
    results: list = []

    def produce(writer) -> dict:
        mapper = executor or functools.partial(map_sequential, progress=progress)
        results.extend(sorted(mapper(make_task(PartSink(store, writer.data_dir)), shards, errors=errors),
                              key=lambda r: r.shard))
        if len(results) != len(shards):
            raise RuntimeError(f"ingest of {source}: {len(results)} shard results for {len(shards)} shards")
        parts = [(s, f"{r.uri} part {i}") for r in results for i, s in enumerate(r.stats)]
        if not parts:
            raise empty_error or SourceFormatError(f"source {source!r}: no steps")
        meta = rlds.merge_stats([p[0] for p in parts], [p[1] for p in parts])
        meta.update(metadata(results))
        writer.add_files([f for r in results for f in r.files], rows=sum(r.rows for r in results),
                         schema=STEP_SCHEMA)
        return {source: meta}

    out = commit_output(store, key, stage, stage_config, inputs, produce, force=force, quiet=True)
    return IngestResult(key=key, manifest=out.manifest, skipped=out.skipped, shard_results=results)


SOURCE_REQUIRED = "--source (the source name in the store)"


def _require(kind: str, value: str, what: str) -> None:
    if not value:
        raise ValueError(f"ingest {kind}: {what} is required")


def _positive(value: int, what: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


# -- RLDS (Open X-Embodiment) --------------------------------------------------------------------


@dataclass(frozen=True)
class RLDSIngestConfig:
    """``distcur ingest rlds``: a TFDS RLDS dataset directory into ``steps/source=<source>``.

    ``dataset`` names a shipped :class:`~distcur.sources.rlds_configs.RLDSConfig`; with
    ``state_keys`` and ``action_keys`` it names a generic one built from the key fields instead.
    """

    path: str = field(default="", metadata={"help": "dataset directory holding dataset_info.json, features.json "
                                                    "and the shards"})
    dataset: str = field(default="", metadata={"help": "shipped config name (see --state-keys for a dataset "
                                                       "without one)"})
    source: str | None = field(default=None, metadata={"help": "source name in the store (default: the dataset "
                                                               "name)"})
    splits: tuple[str, ...] = field(default=("train",), metadata={"help": "splits to read, in order"})
    state_keys: tuple[str, ...] | None = field(default=None, metadata={
        "help": "generic config: step feature paths concatenated into state, e.g. observation/state"})
    action_keys: tuple[str, ...] | None = field(default=None, metadata={
        "help": "generic config: step feature paths concatenated into action, e.g. action"})
    language_key: str | None = field(default=None, metadata={"help": "generic config: e.g. language_instruction"})
    language_encoding: str = field(default="utf8", metadata={"choices": LANGUAGE_ENCODINGS})
    image_keys: tuple[str, ...] = field(default=(), metadata={"help": "generic config: camera keys, first one is "
                                                                      "kept"})
    control_frequency: float | None = field(default=None, metadata={"help": "generic config: Hz"})
    rows_per_part: int = field(default=100_000, metadata={"help": "steps per Parquet part (memory bound)"})

    def __post_init__(self) -> None:
        _require("rlds", self.path, "PATH (the dataset directory)")
        _require("rlds", self.dataset, "--dataset (a shipped config name, or the name of a generic config with "
                                       "--state-keys and --action-keys)")
        if bool(self.state_keys) != bool(self.action_keys):
            raise ValueError("a generic RLDS config needs both --state-keys and --action-keys")
        if self.language_encoding not in LANGUAGE_ENCODINGS:
            raise ValueError(f"ingest rlds: language_encoding must be one of {LANGUAGE_ENCODINGS}, got "
                             f"{self.language_encoding!r}")
        if not self.splits:
            raise ValueError("ingest rlds: name at least one split")
        _positive(self.rows_per_part, "ingest rlds: rows_per_part")

    def rlds_config(self) -> RLDSConfig:
        """The shipped config named by ``dataset``, or a generic one when keys are given."""
        if self.state_keys:
            return config_from_keys(self.dataset, self.state_keys, self.action_keys, language_key=self.language_key,
                                    image_keys=self.image_keys, language_encoding=self.language_encoding,
                                    control_frequency=self.control_frequency)
        return get_config(self.dataset)


def run_rlds(store: Store, config: RLDSIngestConfig, executor: Callable | None = None, *,
             rlds_config: RLDSConfig | None = None, force: bool = False, progress: bool = True) -> IngestResult:
    """Ingest an RLDS dataset into ``steps/source=<source>`` of ``store`` and commit it.

    ``rlds_config`` overrides the one ``config`` names (a dataset described in code). ``executor``
    runs :func:`distcur.sources.rlds.ingest_shard` on every shard (default: sequentially here;
    :class:`distcur.distributed.ingest.RayDataShards` for Ray Data).
    """
    rc = rlds_config or config.rlds_config()
    source = config.source or rc.name
    splits = tuple(config.splits)
    dataset = rlds.open_rlds_dataset(config.path, splits)
    rlds.check_config(dataset, rc)
    stage_config = {"dataset": dataset.uri, "splits": list(splits), "source": source, "rlds_config": rc.to_dict(),
                    "rows_per_part": config.rows_per_part}
    inputs = {"rlds": fingerprint(dataset.identity())}

    def make_task(sink: PartSink):
        return functools.partial(rlds.ingest_shard, features_json=dataset.features_json, config=rc, source=source,
                                 sink=sink, rows_per_part=config.rows_per_part)

    def metadata(results: list[rlds.ShardResult]) -> dict:
        return dict(dataset=dataset.name, dataset_uri=dataset.uri, version=dataset.version,
                    file_format=dataset.file_format, shards=len(dataset.shards),
                    empty_episodes=sum(r.empty_episodes for r in results), control_frequency=rc.control_frequency,
                    state_keys=list(rc.state_keys), action_keys=list(rc.action_keys),
                    image_key=rc.image_keys[0] if rc.image_keys else None)

    return commit_shards(store, source, rlds.STAGE, stage_config, inputs, dataset.shards, make_task, metadata,
                         executor=executor, errors=RLDS_ERRORS, force=force, progress=progress,
                         empty_error=rlds.RLDSFormatError(f"{dataset.uri}: dataset is empty (no steps in splits "
                                                          f"{list(splits)})"))


# -- robomimic / LIBERO HDF5 ---------------------------------------------------------------------


@dataclass(frozen=True)
class HDF5IngestConfig:
    """``distcur ingest hdf5``: robomimic / LIBERO HDF5 files into ``steps/source=<source>``."""

    paths: tuple[str, ...] = field(default=(), metadata={"help": "HDF5 files (local or mounted paths)"})
    source: str = field(default="", metadata={"help": "source name in the store"})
    hdf5: hdf5.HDF5Config = field(default_factory=hdf5.HDF5Config)
    demos_per_shard: int | None = field(default=None, metadata={"help": "demos per read task (default: one task "
                                                                        "per file)"})
    rows_per_part: int = field(default=100_000, metadata={"help": "steps per Parquet part (memory bound)"})

    def __post_init__(self) -> None:
        _require("hdf5", self.source, SOURCE_REQUIRED)
        if self.demos_per_shard is not None:
            _positive(self.demos_per_shard, "ingest hdf5: demos_per_shard")
        _positive(self.rows_per_part, "ingest hdf5: rows_per_part")


def run_hdf5(store: Store, config: HDF5IngestConfig, executor: Callable | None = None, *, force: bool = False,
             progress: bool = True) -> IngestResult:
    """Ingest robomimic / LIBERO HDF5 files into ``steps/source=<source>`` and commit it; the output
    is the same on any executor (sequential by default, Ray Data with
    :class:`distcur.distributed.ingest.RayDataShards`)."""
    hc = config.hdf5
    plan = hdf5.plan_hdf5(list(config.paths), hc, config.demos_per_shard)
    stage_config = {"files": plan.uris, "source": config.source, "hdf5_config": hc.to_dict(),
                    "obs_keys": plan.obs_keys, "demos_per_shard": config.demos_per_shard,
                    "rows_per_part": config.rows_per_part}
    inputs = {"hdf5": fingerprint(plan.identity())}

    def make_task(sink: PartSink):
        return functools.partial(hdf5.read_shard, plan=plan, config=hc, source=config.source, sink=sink,
                                 rows_per_part=config.rows_per_part)

    return commit_shards(store, config.source, hdf5.STAGE, stage_config, inputs, plan.shards, make_task,
                         lambda results: hdf5.hdf5_metadata(plan, hc, results), executor=executor, force=force,
                         progress=progress,
                         empty_error=SourceFormatError(f"source {config.source!r}: no demos in the files given"))


# -- your own Parquet / Arrow step table ---------------------------------------------------------


@dataclass(frozen=True)
class ParquetIngestConfig:
    """``distcur ingest parquet``: a Parquet/Arrow step table (a file or a folder) into
    ``steps/source=<source>``; ``map`` says which of your columns makes each canonical one."""

    path: str = field(default="", metadata={"help": "a .parquet/.arrow/.feather file or a folder of them (local "
                                                    "or s3://)"})
    source: str = field(default="", metadata={"help": "source name in the store"})
    map: tuple[str, ...] = field(default=(), metadata={
        "help": "canonical column = your column (a list column) or several scalar columns joined by commas, e.g. "
                "state=obs.state action=act episode=ep_id step=t task=instruction; episode, state and action are "
                "required; also step, task, reward, image, is_terminal, success"})
    rows_per_part: int = field(default=100_000, metadata={"help": "steps per Parquet part (memory bound)"})

    def __post_init__(self) -> None:
        _require("parquet", self.path, "PATH (a file or a folder)")
        _require("parquet", self.source, SOURCE_REQUIRED)
        self.mapping  # noqa: B018 (checks the --map items, naming the bad one)
        _positive(self.rows_per_part, "ingest parquet: rows_per_part")

    @property
    def mapping(self) -> dict[str, tuple[str, ...]]:
        """{canonical: (your columns...)} of :attr:`map`."""
        return parquet.parse_mapping(list(self.map))


def run_parquet(store: Store, config: ParquetIngestConfig, executor: Callable | None = None, *,
                force: bool = False, progress: bool = True) -> IngestResult:
    """Ingest a Parquet/Arrow step table (a file or a folder of files) into ``steps/source=<source>``."""
    mapping = config.mapping
    plan = parquet.plan_parquet(config.path)
    stage_config = {"path": plan.uri, "source": config.source, "map": {k: list(v) for k, v in mapping.items()},
                    "rows_per_part": config.rows_per_part}
    inputs = {"parquet": fingerprint(plan.identity())}

    def make_task(sink: PartSink):
        return functools.partial(parquet.ingest_parquet_file, mapping=mapping, source=config.source, sink=sink,
                                 rows_per_part=config.rows_per_part)

    return commit_shards(store, config.source, parquet.STAGE, stage_config, inputs, plan.shards, make_task,
                         lambda results: parquet.parquet_metadata(plan, mapping, results), executor=executor,
                         force=force, progress=progress)


# -- LeRobot v3 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeRobotIngestConfig:
    """``distcur ingest lerobot``: a LeRobot v3 dataset root into ``steps/source=<source>``.

    ``reader``: ``ray-lerobot`` (``ray.data.read_lerobot``), ``files`` (one task per data file on
    the executor) or ``auto``: read_lerobot when the executor can run it (Ray Data) and the
    ``lerobot`` package is importable, else the files.
    """

    root: str = field(default="", metadata={"help": "dataset root holding meta/info.json, meta/tasks.parquet, "
                                                    "meta/episodes/, data/"})
    source: str = field(default="", metadata={"help": "source name in the store"})
    lerobot: lerobot.LeRobotConfig = field(default_factory=lerobot.LeRobotConfig)
    reader: str = field(default="auto", metadata={
        "choices": LEROBOT_READERS,
        "help": "ray-lerobot: ray.data.read_lerobot (needs the lerobot package >= 0.5, Python >= 3.12); files: one "
                "task per data file; auto (default): ray-lerobot when it can run, else files"})
    rows_per_part: int = field(default=100_000, metadata={"help": "steps per Parquet part (memory bound)"})

    def __post_init__(self) -> None:
        _require("lerobot", self.root, "ROOT (the dataset root)")
        _require("lerobot", self.source, SOURCE_REQUIRED)
        if self.reader not in LEROBOT_READERS:
            raise ValueError(f"ingest lerobot: reader must be auto, ray-lerobot or files, got {self.reader!r}")
        _positive(self.rows_per_part, "ingest lerobot: rows_per_part")


def run_lerobot(store: Store, config: LeRobotIngestConfig, executor: Callable | None = None, *,
                force: bool = False, progress: bool = True) -> IngestResult:
    """Ingest a LeRobot v3 dataset into ``steps/source=<source>`` and commit it."""
    lc, source = config.lerobot, config.source
    uri = str(config.root) if "://" in str(config.root) else os.path.abspath(str(config.root))
    ds = lerobot.open_lerobot(uri, lc)
    reader = config.reader
    if reader == "auto":
        reader = "ray-lerobot" if hasattr(executor, "read_lerobot") and lerobot.lerobot_reader_available() else "files"
        if executor is not None and reader == "files":
            log.info(
                "ray.data.read_lerobot needs the lerobot package (>= 0.5, Python >= 3.12); reading the data files "
                "with one task each")
    stage_config = {"root": uri, "source": source, "lerobot_config": lc.to_dict(), "rows_per_part": config.rows_per_part}
    inputs = {"lerobot": fingerprint(ds.identity())}
    if reader == "ray-lerobot":
        from distcur.deps import require

        require("lerobot", "ray.data.read_lerobot")
        if hasattr(executor, "read_lerobot"):
            batches = executor.read_lerobot
        else:  # read_lerobot is Ray Data's: it runs on Ray even when the files would be read here
            from distcur.distributed.ingest import read_lerobot_batches as batches

        def make_task(sink: PartSink):
            return lambda _: lerobot.convert_frame_batches(batches(ds.uri), ds, lc, source, sink, config.rows_per_part)

        shards: list = [None]
        executor = _run_in_driver
    else:
        shards = [lerobot.LeRobotShard(uri=uri, file=f, index=i) for i, f in enumerate(ds.files)]

        def make_task(sink: PartSink):
            return functools.partial(lerobot.ingest_lerobot_file, ds=ds, config=lc, source=source, sink=sink,
                                     rows_per_part=config.rows_per_part)

    return commit_shards(store, source, lerobot.STAGE, stage_config, inputs, shards, make_task,
                         lambda results: lerobot.lerobot_metadata(ds, lc, reader, results), executor=executor,
                         force=force, progress=progress)


def _run_in_driver(task: Callable, shards: list, errors=()) -> list:
    """The one 'shard' of a streamed read, run here (its frames come from Ray Data)."""
    return [task(s) for s in shards]


# -- MetaWorld (generated) -----------------------------------------------------------------------


@dataclass
class MetaWorldIngestConfig:
    """``distcur ingest metaworld``: the generated prior and target sets, plus ``heldout_demos``
    fresh expert demos of the target at ``steps/source=target-<task>-heldout`` (what ``distcur
    evaluate`` scores the proxy loss on; 0: none)."""

    prior: MetaWorldPriorConfig = field(default_factory=MetaWorldPriorConfig)
    heldout_demos: int = field(default=5, metadata={
        "help": "fresh expert demos of the target, never trained on, at steps/source=target-<task>-heldout: what "
                "`distcur evaluate` scores the proxy loss on (default 5, as `distcur demo`; 0: none)"})

    def __post_init__(self) -> None:
        if not isinstance(self.heldout_demos, int) or self.heldout_demos < 0:
            raise ValueError(f"--heldout-demos must be >= 0, got {self.heldout_demos!r}")


def _output_info(key: str, manifest: Manifest, skipped: bool) -> dict:
    return {
        "key": key,
        "skipped": skipped,
        "rows": manifest.rows,
        "episodes": sum(s["episodes"] for s in manifest.metadata["sources"].values()),
        "tasks": manifest.metadata["tasks"],
    }


def run_metaworld(store: Store, config: MetaWorldIngestConfig, executor: Callable | None = None, *,
                  force: bool = False, progress: bool = True) -> dict:
    """Generate the prior (``steps/source=metaworld``), the target (``steps/source=target-<task>``)
    and the held-out target demos.

    Each output is skipped when its committed manifest matches the config (resume). The generation
    jobs of (task x chunk) run on ``executor(fn, items) -> list`` (default: Ray tasks,
    :class:`distcur.distributed.tasks.RayTasks`). Returns ``{"prior": info, "target": info,
    "wall_s"}`` (+ ``"heldout"`` when ``heldout_demos``) where info is ``{"key", "skipped", "rows",
    "episodes", "tasks": per-task counts}``.
    """
    cfg = config.prior
    if cfg.image_size:  # before Ray starts, so that its workers render headless too
        use_headless_gl()
    t0 = time.time()
    outputs = {
        "prior": (steps_key(mw.PRIOR_SOURCE), cfg.to_dict()),
        "target": (steps_key(target_source(cfg.target)), cfg.target_config()),
    }
    todo = {name: force or not store.is_done(key, mw.STAGE, conf, {}) for name, (key, conf) in outputs.items()}
    prior_specs, target_specs = mw.plan_episodes(cfg)
    chunks = {
        "prior": mw.chunk_specs(prior_specs, cfg.chunk_episodes) if todo["prior"] else [],
        "target": mw.chunk_specs(target_specs, cfg.chunk_episodes) if todo["target"] else [],
    }
    all_chunks = chunks["prior"] + chunks["target"]
    results: list = []
    if all_chunks:
        if executor is None:
            from distcur.distributed.tasks import RayTasks

            executor = RayTasks(progress=progress, label="metaworld episodes")
        results = mw.generate_chunks(cfg, all_chunks, executor)
    split = {"prior": results[: len(chunks["prior"])], "target": results[len(chunks["prior"]) :]}
    extra = mw.output_metadata(cfg)
    out: dict[str, Any] = {}
    for name, (key, conf) in outputs.items():
        made = commit_table(store, key, mw.STAGE, conf, {},
                            lambda name=name, key=key: mw.source_table(split[name], extra, store.uri_of(key)),
                            force=todo[name], quiet=True)
        out[name] = _output_info(key, made.manifest, skipped=made.skipped)
    if config.heldout_demos:
        key = ingest_heldout(store, cfg, config.heldout_demos, force=force).key
        out["heldout"] = {"key": store.uri_of(key), "rows": store.manifest(key).rows}
    out["wall_s"] = round(time.time() - t0, 3)
    return out


def ingest_heldout(store: Store, prior_cfg: MetaWorldPriorConfig, n: int, *, force: bool = False):
    """``n`` fresh expert demos of the target, never trained on, at ``steps/source=target-<task>-heldout``
    (their initial states come from episode indices after the training demos', so they differ)."""
    source = heldout_source(prior_cfg.target)
    config = {**prior_cfg.target_config(), "heldout": n}

    def make() -> tuple[pa.Table, None]:
        table, _ = mw.generate_chunk(prior_cfg, mw.heldout_specs(prior_cfg, source, n))
        return table, None

    return commit_table(store, steps_key(source), HELDOUT_STAGE, config, {}, make, force=force, quiet=True)
