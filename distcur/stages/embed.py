"""The embed stage: fit an encoder on a sample of the prior, then embed every step.

1. ``fit_encoder`` streams the fit sources part by part, keeps a uniform random sample of at
   most ``max_fit_rows`` steps (bounded memory), fits the encoder on it, and commits its bytes
   at ``encoders/<name>/`` with a manifest (skipped when the same config and inputs are done).
2. ``embed_source`` hands one source's parquet files (named by its manifest) to a Ray Data map
   executor (:class:`distcur.distributed.embed.RayDataMap`: ``read_parquet``, ``map_batches``
   with a pool of embedding actors, each holding one rebuilt encoder); the actors' output is
   written by Ray Data under a fresh data dir and committed as ``embeddings/<name>/source=<source>`` with
   :data:`distcur.schema.EMBEDDING_SCHEMA`. No process ever holds a whole source: image
   encoders decode their batch's PNG / JPEG bytes inside the actor, a chunk at a time.

``device`` (``auto|cpu|cuda``, :mod:`distcur.devices`): the fit runs on the driver's CUDA when it
has one (``auto``, ``cuda``); ``cuda`` on a driver without CUDA runs the fit as a Ray task on a
GPU node. Each embedding actor asks Ray for ``num_gpus_per_actor`` GPUs when the device is
CUDA (``auto``: when the cluster has GPUs), and runs on the GPU Ray gives it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distcur.data import embeddings_key, is_target_source, list_sources, steps_key
from distcur.devices import DEVICES, actor_device, check_device, ray_gpus, resolve_device
from distcur.embed.encoders import SAMPLE_KEYS, Batch, Encoder, build_encoder, encoder_from_bytes
from distcur.progress import bar
from distcur.schema import EMBEDDING_SCHEMA, describe_row, list_column_to_numpy
from distcur.stages.output import commit_output
from distcur.store import Manifest, Store
from distcur.torchio import UnreadableFileError

log = logging.getLogger(__name__)

ENCODERS_PREFIX = "encoders"
ENCODER_FILE = "encoder.bin"
KEY_COLUMNS = ("source", "episode", "step")


@dataclass
class EmbedConfig:
    """Options of ``distcur embed``.

    ``sources`` default to every source in the store; ``fit_sources`` to the sources that are
    not target demonstrations (``target-*``), i.e. the prior. ``batch_size``, ``concurrency``
    and the per-actor resources change how the work runs, not its result, so they are left
    out of the manifest fingerprint; so do ``device`` and ``num_gpus_per_actor`` (GPUs per
    embedding actor when the device is CUDA; a fraction shares a GPU between actors).
    """

    encoder: str = field(default="vae", metadata={"help": "registered encoder: vae (default), state, action, "
                         "state-action, image-vae (conv VAE on the frames), backbone (pretrained ViT: "
                         "encoder_options.weights), image"})
    encoder_options: dict = field(default_factory=dict)
    sources: list[str] | None = field(default=None, metadata={"help": "sources to embed (default: all in the store)"})
    fit_sources: list[str] | None = field(default=None, metadata={
        "help": "sources the encoder is fit on (default: the non-target ones)"})
    max_fit_rows: int = field(default=200_000, metadata={"help": "most steps in the fit sample"})
    seed: int = field(default=0, metadata={"help": "seed of the fit sample"})
    batch_size: int = field(default=4096, metadata={"help": "steps per embedding batch"})
    concurrency: int = field(default=2, metadata={"help": "embedding actors in the Ray Data pool"})
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 1.0
    device: str = field(default="auto", metadata={
        "help": "where the encoder fits and embeds: auto (CUDA when present; default), cpu, cuda", "choices": DEVICES})

    def __post_init__(self) -> None:
        check_device(self.device, "EmbedConfig.device")
        if not 0 < self.num_gpus_per_actor <= 8:
            raise ValueError(f"EmbedConfig.num_gpus_per_actor must be in (0, 8] (GPUs per actor when the device is "
                             f"CUDA; device: cpu asks for none), got {self.num_gpus_per_actor}")
        if self.max_fit_rows < 2:
            raise ValueError(f"EmbedConfig.max_fit_rows must be >= 2, got {self.max_fit_rows}")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError(f"EmbedConfig: batch_size and concurrency must be >= 1, got "
                             f"{self.batch_size}, {self.concurrency}")


def encoder_key(name: str) -> str:
    return f"{ENCODERS_PREFIX}/{name}"


def _batch_from_table(table: pa.Table, columns: tuple[str, ...]) -> Batch:
    batch: Batch = {}
    for c in columns:
        if c in ("state", "action"):
            batch[c] = list_column_to_numpy(table.column(c), c)
        elif c in ("episode", "step"):
            batch[c] = table.column(c).to_numpy()
        else:
            batch[c] = np.asarray(table.column(c).to_pylist(), dtype=object)
    return batch


def embed_table(encoder: Encoder, table: pa.Table) -> pa.Table:
    """Embed the steps of ``table`` (key columns + ``encoder.columns``) -> EMBEDDING_SCHEMA table.

    Image encoders also get the rows' keys (:data:`SAMPLE_KEYS`), so a bad frame is named by its step."""
    columns = (*encoder.columns, *SAMPLE_KEYS) if "image" in encoder.columns else encoder.columns
    z = encoder.encode(_batch_from_table(table, columns)) if table.num_rows else np.zeros((0, 0), np.float32)
    z = np.ascontiguousarray(z, dtype=np.float32)
    if table.num_rows and not np.isfinite(z).all():
        row = int(np.argmax(~np.isfinite(z).all(1)))
        keys = tuple(table.column(c).to_numpy(zero_copy_only=False) for c in ("source", "episode", "step"))
        raise ValueError(f"encoder {encoder.name!r} produced a non-finite embedding at {describe_row(row, keys)}")
    dim = z.shape[1] if z.ndim == 2 else 0
    offsets = pa.array(np.arange(0, len(z) * dim + 1, max(dim, 1), dtype=np.int32)[: len(z) + 1])
    z_col = pa.ListArray.from_arrays(offsets, pa.array(z.ravel(), pa.float32()))
    return pa.Table.from_arrays(
        [table.column("source").cast(pa.string()), table.column("episode").cast(pa.int64()),
         table.column("step").cast(pa.int32()), z_col],
        schema=EMBEDDING_SCHEMA,
    )


def sample_steps(store: Store, sources: list[str], columns: tuple[str, ...], max_rows: int, seed: int = 0) -> Batch:
    """A uniform random sample (without replacement) of at most ``max_rows`` steps of ``sources``.

    Streams the tables part by part and keeps the rows with the smallest random keys, so memory
    stays at O(max_rows + one batch) however large the sources are.
    """
    rng = np.random.default_rng(seed)
    kept: Batch | None = None
    kept_keys = np.zeros(0)
    for src in sources:
        for rb in store.iter_batches(steps_key(src), columns=list(columns)):
            batch = _batch_from_table(pa.Table.from_batches([rb]), columns)
            keys = rng.random(rb.num_rows)
            if kept is None:
                kept, kept_keys = batch, keys
            else:
                for c in columns:
                    if batch[c].shape[1:] != kept[c].shape[1:]:
                        raise ValueError(f"sample_steps: column {c!r} of source {src!r} has shape "
                                         f"{batch[c].shape[1:]} but earlier sources have {kept[c].shape[1:]}")
                kept = {c: np.concatenate([kept[c], batch[c]]) for c in columns}
                kept_keys = np.concatenate([kept_keys, keys])
            if len(kept_keys) > max_rows:
                idx = np.argpartition(kept_keys, max_rows - 1)[:max_rows]
                kept = {c: v[idx] for c, v in kept.items()}
                kept_keys = kept_keys[idx]
    if kept is None:
        raise ValueError(f"sample_steps: sources {sources} hold no steps")
    return kept


def _default_sources(store: Store, config: EmbedConfig) -> tuple[list[str], list[str]]:
    sources = config.sources if config.sources is not None else list_sources(store)
    if not sources:
        raise FileNotFoundError(f"no step tables to embed under {store.uri_of('steps')}")
    fit_sources = config.fit_sources
    if fit_sources is None:
        fit_sources = [s for s in sources if not is_target_source(s)]
    return list(sources), list(fit_sources)


def _fit_here(name: str, options: dict, sample: Batch, device: str) -> tuple[bytes, dict]:
    """Fit a new encoder ``name`` (built from ``options``) on ``sample`` on ``device``; (bytes, summary)."""
    encoder = build_encoder(name, options).to_device(resolve_device(device, "EmbedConfig.device"))
    summary = encoder.fit(sample)
    return encoder.to_bytes(), summary


def _fit(encoder: Encoder, config: EmbedConfig, sample: Batch, executor) -> tuple[Encoder, dict]:
    """Fit on the driver (its CUDA for ``auto`` / ``cuda`` when it has one), or, for ``cuda`` on a driver
    without CUDA, in a Ray task holding a GPU; returns the fitted encoder (on the CPU) and the summary."""
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        executor.start()
        gpus = ray_gpus("cuda", "EmbedConfig.device")
        log.info("fitting encoder %s in a Ray task on a GPU node (no CUDA on the driver)", config.encoder)
        blob, summary = executor.call(_fit_here, config.encoder, config.encoder_options, sample, "cuda",
                                      num_gpus=gpus)
        return encoder_from_bytes(config.encoder, blob), summary
    summary = encoder.to_device(resolve_device(config.device, "EmbedConfig.device")).fit(sample)
    return encoder.to_device("cpu"), summary


def fit_encoder(store: Store, config: EmbedConfig, address: str | None = None,
                executor: Any = None) -> tuple[Encoder, Manifest]:
    """Fit (or, when already done with the same config and inputs, load) the configured encoder."""
    encoder = build_encoder(config.encoder, config.encoder_options)
    _, fit_sources = _default_sources(store, config)
    stage_config = {"encoder": config.encoder, "options": encoder.config(), "fit_sources": fit_sources,
                    "max_fit_rows": config.max_fit_rows, "seed": config.seed}
    inputs = {steps_key(s): store.input_fingerprint(steps_key(s)) for s in fit_sources} if encoder.needs_fit else {}
    key = encoder_key(encoder.out_name)
    fitted = encoder

    def produce(writer) -> dict:
        # the writer's clock starts before the fit, so the manifest's wall_s is the stage's whole time
        nonlocal fitted
        summary: dict = {}
        if encoder.needs_fit:
            if not fit_sources:
                raise ValueError(f"encoder {config.encoder!r} must be fit but no prior source is given "
                                 "(fit_sources is empty; target-* sources are excluded by default)")
            max_rows = min(config.max_fit_rows, encoder.max_fit_rows or config.max_fit_rows)
            sample = sample_steps(store, fit_sources, (*encoder.columns, *SAMPLE_KEYS), max_rows, config.seed)
            fitted, summary = _fit(encoder, config, sample, executor or _ray_data(address))
        rel = f"{writer.data_dir}/{ENCODER_FILE}"
        store.write_bytes(rel, fitted.to_bytes())
        writer.add_files([rel], rows=0)
        return {"registry_name": config.encoder, "fit": summary}

    out = commit_output(store, key, "fit-encoder", stage_config, inputs, produce, quiet=True)
    if out.skipped:
        log.info("encoder %s already fit with this config and inputs: loading it", key)
        return load_encoder(store, encoder.out_name, config.encoder), out.manifest
    return fitted, out.manifest


def _ray_data(address: str | None):
    from distcur.distributed.embed import RayDataMap

    return RayDataMap(address)


def load_encoder(store: Store, out_name: str, registry_name: str | None = None) -> Encoder:
    """The fitted encoder committed at ``encoders/<out_name>``."""
    m = store.manifest(encoder_key(out_name))
    if m is None:
        raise FileNotFoundError(f"no fitted encoder at {store.uri_of(encoder_key(out_name))}; run `distcur embed` first")
    name = registry_name or m.metadata.get("registry_name") or out_name
    try:
        return encoder_from_bytes(name, store.read_bytes(m.files[0]))
    except UnreadableFileError as e:
        raise UnreadableFileError(f"{store.uri_of(m.files[0])}: {e}") from e


def _embedding_dim(store: Store, rels: list[str]) -> int:
    for rel in rels:
        pf = pq.ParquetFile(store.fs.open_input_file(store.path(rel)))
        for rb in pf.iter_batches(batch_size=1, columns=["z"]):
            if rb.num_rows:
                return len(rb.column(0)[0])
    return 0


class _EmbedActor:
    """One Ray Data actor: loads the committed encoder once, then embeds batch after batch.

    It reads the encoder from the store rather than taking its bytes as an argument: arguments
    that large live in the object store, where a restarted actor may no longer find them (Ray
    warns about it for every pool)."""

    def __init__(self, store: Store, out_name: str, registry_name: str, num_threads: int = 1, device: str = "cpu"):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.device = actor_device(device, "EmbedConfig.device")
        self.encoder = load_encoder(store, out_name, registry_name).to_device(self.device)

    def __call__(self, table: pa.Table) -> pa.Table:
        return embed_table(self.encoder, table)


def _embed_identity(store: Store, encoder: Encoder, encoder_manifest: Manifest, source: str,
                    config: EmbedConfig) -> tuple[str, dict, dict[str, str]]:
    """(key, stage config, inputs) of ``source``'s embedding table."""
    key = embeddings_key(encoder.out_name, source)
    stage_config = {"encoder": config.encoder, "encoder_fingerprint": encoder_manifest.fingerprint}
    inputs = {steps_key(source): store.input_fingerprint(steps_key(source)),
              encoder_key(encoder.out_name): encoder_manifest.fingerprint}
    return key, stage_config, inputs


def embed_source(store: Store, encoder: Encoder, encoder_manifest: Manifest, source: str,
                 config: EmbedConfig, executor: Any = None) -> Manifest:
    """Embed every step of ``source`` by the Ray Data map ``executor``; commit ``embeddings/<name>/source=<source>``."""
    executor = executor or _ray_data(None)
    key, stage_config, inputs = _embed_identity(store, encoder, encoder_manifest, source, config)

    def produce(writer) -> dict:
        executor.start()
        gpus = ray_gpus(config.device, "EmbedConfig.device") * config.num_gpus_per_actor
        executor.map_parquet(
            store.files(steps_key(source)), store.fs, [*KEY_COLUMNS, *encoder.columns], _EmbedActor,
            {"store": store, "out_name": encoder.out_name, "registry_name": config.encoder,
             "num_threads": int(max(1, config.num_cpus_per_actor)), "device": config.device if gpus else "cpu"},
            store.path(writer.data_dir), batch_size=config.batch_size, concurrency=config.concurrency,
            num_cpus=config.num_cpus_per_actor, num_gpus=gpus)
        rels, rows = [], 0
        for name in store.listdir(writer.data_dir):
            if name.endswith(".parquet"):
                rel = f"{writer.data_dir}/{name}"
                rows += pq.read_metadata(store.path(rel), filesystem=store.fs).num_rows
                rels.append(rel)
        writer.add_files(rels, rows, EMBEDDING_SCHEMA)
        if not rels:  # an empty source still commits a readable, empty table
            writer.write(EMBEDDING_SCHEMA.empty_table())
        return {"encoder": encoder.out_name, "source": source, "dim": _embedding_dim(store, rels),
                "gpus_per_actor": gpus}

    return commit_output(store, key, "embed", stage_config, inputs, produce).manifest


def run(store: Store, config: EmbedConfig, address: str | None = None, executor: Any = None) -> dict[str, Manifest]:
    """Fit the encoder and embed every configured source; returns {embedding key: manifest}.

    ``executor``: a :class:`distcur.distributed.embed.RayDataMap` (default: one on the Ray at ``address``)."""
    executor = executor or _ray_data(address)
    sources, _ = _default_sources(store, config)
    encoder, enc_manifest = fit_encoder(store, config, address, executor)
    identities = [_embed_identity(store, encoder, enc_manifest, s, config) for s in sources]
    if all(store.is_done(key, "embed", stage_config, inputs) for key, stage_config, inputs in identities):
        log.info("embeddings/%s: all %d sources up to date, skipped (Ray not started)", encoder.out_name, len(sources))
        return {key: store.manifest(key) for key, _, _ in identities}
    executor.start()
    out = {}
    # Ray Data's own bars are off at a quiet terminal (distcur.logs); this one moves while each source's
    # Ray Data job runs
    with bar(total=len(sources), desc=f"embedding ({encoder.out_name})", unit="source") as sources_bar:
        for src in sources:
            out[embeddings_key(encoder.out_name, src)] = embed_source(store, encoder, enc_manifest, src, config,
                                                                      executor)
            sources_bar.update()
    return out
