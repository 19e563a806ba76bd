"""One storage API over a local folder (the default) and ``s3://bucket/prefix``.

Layout of one stage output ("a table") under the store root::

    <key>/manifest.json                 the commit record (written last, in one PUT / rename)
    <key>/_data-<version>/part-*.parquet immutable data files of that version

A table is committed when its ``manifest.json`` is written: the manifest names its data
files explicitly, so a reader never lists a directory and never sees a half-written table.
A writer puts every part under a fresh ``_data-<version>/`` prefix (invisible until the
manifest points at it), then replaces the manifest atomically (local: ``os.replace``;
S3: a single PUT, which S3 makes visible atomically). The previous version stays intact
until the new manifest lands, after which it is garbage-collected. A stage whose manifest
records the same config and input fingerprints is skipped: a rerun resumes for free.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distcur import __version__

MANIFEST = "manifest.json"
LAYOUT_VERSION = 1
PART_NAME = "part-{index:05d}.parquet"


def fingerprint(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (dict key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _s3_filesystem(uri: str) -> pafs.S3FileSystem:
    """An S3 filesystem from the standard AWS variables, with an endpoint override.

    ``DISTCUR_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) points at an
    S3-compatible server; credentials and region come from the usual AWS variables.
    """
    endpoint = (
        os.environ.get("DISTCUR_S3_ENDPOINT")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://bucket/prefix`` URI."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return _s3_filesystem(uri), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported store URI {uri!r}: expected a local path or s3://bucket/prefix")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


@dataclass
class Manifest:
    """What a committed stage output is and how it was made."""

    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]
    files: list[str]
    rows: int
    schema: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    distcur_version: str = __version__
    layout_version: int = LAYOUT_VERSION
    created: float = field(default_factory=time.time)

    @property
    def fingerprint(self) -> str:
        """Identity of the output: its stage, config and inputs (not its timing)."""
        return fingerprint({"stage": self.stage, "config": self.config, "inputs": self.inputs})

    def to_json(self) -> str:
        d = self.__dict__.copy()
        d["fingerprint"] = self.fingerprint
        return json.dumps(d, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        d.pop("fingerprint", None)
        return cls(**d)


class TableWriter:
    """Writes the parts of one table version; ``commit`` makes them visible at once."""

    def __init__(self, store: Store, key: str, stage: str, config: dict, inputs: dict[str, str]):
        self.store, self.key, self.stage = store, key.strip("/"), stage
        self.config, self.inputs = config, inputs
        self.data_dir = f"{self.key}/_data-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.files: list[str] = []
        self.rows = 0
        self.schema: pa.Schema | None = None
        self._t0 = time.time()

    def write(self, table: pa.Table | pa.RecordBatch) -> str:
        """Write one part; returns its path relative to the store root."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema, check_metadata=False):
            raise ValueError(
                f"{self.key}: part {len(self.files)} has schema {table.schema} but earlier parts have {self.schema}"
            )
        rel = f"{self.data_dir}/{PART_NAME.format(index=len(self.files))}"
        self.store.write_parquet(rel, table)
        self.files.append(rel)
        self.rows += table.num_rows
        return rel

    def add_files(self, rel_paths: Iterable[str], rows: int, schema: pa.Schema | None = None) -> None:
        """Adopt parts written elsewhere (e.g. by Ray tasks) under ``self.data_dir``."""
        for rel in rel_paths:
            if not rel.startswith(self.data_dir + "/"):
                raise ValueError(f"{rel} is not under this writer's data dir {self.data_dir}")
            self.files.append(rel)
        self.rows += rows
        if schema is not None and self.schema is None:
            self.schema = schema

    def commit(self, metadata: dict | None = None) -> Manifest:
        manifest = Manifest(
            stage=self.stage,
            config=self.config,
            inputs=self.inputs,
            files=sorted(self.files),
            rows=self.rows,
            schema=str(self.schema) if self.schema is not None else "",
            metadata=metadata or {},
            wall_s=round(time.time() - self._t0, 3),
        )
        self.store.write_text(f"{self.key}/{MANIFEST}", manifest.to_json())
        self.store.gc_versions(self.key, keep=self.data_dir)
        return manifest

    def abort(self) -> None:
        self.store.delete_dir(self.data_dir)


class Store:
    """A store rooted at a local folder or ``s3://bucket/prefix``."""

    def __init__(self, uri: str | os.PathLike):
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = resolve(self.uri)
        if isinstance(self.fs, pafs.LocalFileSystem):
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __reduce__(self):  # pyarrow S3 filesystems are re-created from the environment on workers
        return (Store, (self.uri,))

    # -- paths -------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel.strip('/')}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel.strip('/')}"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    # -- raw objects -------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write of one object (local: temp file + rename; S3: a single PUT)."""
        path = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def delete_dir(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def listdir(self, rel: str) -> list[str]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(sel))

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        path = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path, filesystem=self.fs, compression="zstd")

    # -- tables ------------------------------------------------------------------------------
    def manifest(self, key: str) -> Manifest | None:
        """The committed manifest of ``key``, or None when nothing is committed there."""
        rel = f"{key.strip('/')}/{MANIFEST}"
        try:
            return Manifest.from_json(self.read_text(rel))
        except FileNotFoundError:
            return None
        except OSError as e:  # S3 reports a missing key as OSError
            if "NoSuchKey" in str(e) or "does not exist" in str(e) or "Path does not exist" in str(e):
                return None
            raise

    def is_done(self, key: str, stage: str, config: dict, inputs: dict[str, str]) -> bool:
        """True when ``key`` holds an output of this stage made from the same config and inputs."""
        m = self.manifest(key)
        probe = Manifest(stage=stage, config=json.loads(json.dumps(config, default=str)), inputs=inputs,
                         files=[], rows=0)
        return m is not None and m.fingerprint == probe.fingerprint

    def writer(self, key: str, stage: str, config: dict, inputs: dict[str, str] | None = None) -> TableWriter:
        return TableWriter(self, key, stage, json.loads(json.dumps(config, default=str)), inputs or {})

    def write_table(
        self,
        key: str,
        table: pa.Table,
        stage: str,
        config: dict | None = None,
        inputs: dict[str, str] | None = None,
        metadata: dict | None = None,
        rows_per_part: int = 1_000_000,
    ) -> Manifest:
        """Write and commit a whole table in one call."""
        w = self.writer(key, stage, config or {}, inputs)
        try:
            if table.num_rows == 0:
                w.write(table)
            for start in range(0, table.num_rows, rows_per_part):
                w.write(table.slice(start, rows_per_part))
            return w.commit(metadata)
        except BaseException:
            w.abort()
            raise

    def files(self, key: str) -> list[str]:
        m = self.manifest(key)
        if m is None:
            raise FileNotFoundError(f"no committed table at {self.uri_of(key)} (missing {MANIFEST})")
        return [self.path(f) for f in m.files]

    def read_table(self, key: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        paths = self.files(key)
        if not paths:
            raise FileNotFoundError(f"table {self.uri_of(key)} has no data files")
        return pq.ParquetDataset(paths, filesystem=self.fs, filters=filters, partitioning=None).read(columns=columns)

    def iter_batches(self, key: str, columns: list[str] | None = None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Stream a table part by part (bounded memory)."""
        for path in self.files(key):
            pf = pq.ParquetFile(self.fs.open_input_file(path))
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)

    def input_fingerprint(self, key: str) -> str:
        """Fingerprint of a committed input, for a downstream stage's manifest."""
        m = self.manifest(key)
        if m is None:
            raise FileNotFoundError(f"input {self.uri_of(key)} is not a committed table")
        return m.fingerprint

    def gc_versions(self, key: str, keep: str) -> None:
        """Delete data versions of ``key`` other than ``keep`` (after a commit).

        Versions are never modified in place, so a reader holding the old manifest finishes
        reading before a rerun's commit on a single machine; on a cluster, commits of the same
        key are serialised by the stage that owns it."""
        keep_name = keep.rsplit("/", 1)[-1]
        for name in self.listdir(key.strip("/")):
            if name.startswith("_data-") and name != keep_name:
                self.delete_dir(f"{key.strip('/')}/{name}")
