"""One storage API over a local folder (the default) and ``s3://bucket/prefix``.

Layout of one stage output ("a table") under the store root::

    <key>/manifest.json                 the commit record (written last, in one PUT / rename)
    <key>/_data-<version>/part-*.parquet immutable data files of that version

A table is committed when its ``manifest.json`` is written: the manifest names its data
files explicitly, with each one's size, sha256 and (Parquet) row count, so a reader never lists
a directory and never sees a half-written table. A writer puts every part under a fresh
``_data-<version>/`` prefix (invisible until the manifest points at it), then replaces the
manifest atomically (local: ``os.replace``; S3: a single PUT, which S3 makes visible
atomically). A stage whose manifest records the same config and input fingerprints, and whose
parts are all there with their recorded sizes and Parquet footers that read with the recorded
rows and columns, is skipped: a rerun resumes for free (``verify`` also checks every sha256).

Several writers and readers of one key (two machines on a shared S3 store) stay safe because
no version is deleted while anything may still use it:

- a version is garbage-collected only when the current manifest does not reference it and
  nothing was written into it for ``gc_grace_s`` (default :data:`GC_GRACE_S`), so a live
  writer's parts and a reader's just-replaced version survive;
- a commit first touches ``<version>/_alive`` of its own version and of the version it replaces
  (so a reader that just read the old manifest has the grace period to finish), then checks
  that all of its own parts are still there with their sizes, and only then writes the manifest.

The last manifest written wins (S3 has no compare-and-swap through pyarrow); it always points at
complete data. A writer that writes nothing for longer than the grace period may find its parts
collected by another writer's commit: its own commit then refuses with an error instead of
committing a manifest over missing files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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
from distcur.fs import resolve

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LAYOUT_VERSION = 2  # 2: manifests record each part's size, sha256 and rows (1 did not; still read)
PART_NAME = "part-{index:05d}.parquet"
ALIVE = "_alive"  # touched in a version to keep it from garbage collection for the grace period
# seconds a version must have been unreferenced and untouched before a commit may delete it
GC_GRACE_S = float(os.environ.get("DISTCUR_GC_GRACE_S", 3600))


class DamagedTableError(ValueError):
    """A committed table whose manifest or data files are not what the manifest says."""


def _rebuild_hint(stage: str) -> str:
    return f"rebuild it by rerunning the stage that wrote it ({stage!r}) with --force"


# What reading a Parquet file raises for bad bytes (a flipped byte in a footer's column name is a
# UnicodeDecodeError) or an unreachable store.
PARQUET_READ_ERRORS = (pa.ArrowInvalid, OSError, UnicodeDecodeError)


def _is_damage(error: Exception) -> bool:
    """Whether a Parquet read error is the file's fault (bad bytes), not S3's or the network's."""
    return isinstance(error, pa.ArrowInvalid) or "AWS Error" not in str(error)


def _sha256_of(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _part_info(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """{size, sha256, rows} of one written file (rows: its Parquet footer's count, None otherwise)."""
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(path)
    rows = pq.read_metadata(path, filesystem=fs).num_rows if path.endswith(".parquet") else None
    return {"size": info.size, "sha256": _sha256_of(fs, path), "rows": rows}


def schema_columns(schema: str) -> list[str]:
    """The top-level column names of a schema as a manifest records it (``str(pa.Schema)``)."""
    names = []
    for line in schema.splitlines():
        if line.startswith("-- "):  # "-- schema metadata --": the fields are above it
            break
        if line and not line[0].isspace() and ": " in line:
            names.append(line.split(": ", 1)[0])
    return names


def fingerprint(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (dict key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Manifest:
    """What a committed stage output is and how it was made."""

    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]
    files: list[str]
    rows: int
    schema: str = ""
    # {file: {"size", "sha256", "rows"}} for every file in ``files`` (empty in layout 1 manifests)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
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
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        """Parse a manifest; any malformation is a :class:`DamagedTableError` naming ``where``."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DamagedTableError(f"{where}: invalid manifest JSON ({e})") from None
        if not isinstance(d, dict):
            raise DamagedTableError(f"{where}: a manifest must be a JSON object, got {type(d).__name__}")
        d.pop("fingerprint", None)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise DamagedTableError(f"{where}: unknown manifest key(s) {unknown}; known: {sorted(known)}")
        missing = sorted(n for n, f in known.items() if n not in d and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise DamagedTableError(f"{where}: manifest lacks key(s) {missing}")
        expected = {"stage": str, "config": dict, "inputs": dict, "files": list, "rows": int, "parts": dict,
                    "schema": str}
        for name, typ in expected.items():
            if name in d and (not isinstance(d[name], typ) or isinstance(d[name], bool)):
                article = "an" if typ is int else "a"
                raise DamagedTableError(f"{where}: manifest key {name!r} is {d[name]!r}, expected {article} {typ.__name__}")
        # the readers use these as paths and numbers: a wrong type there is damage, not a crash later
        if not all(isinstance(f, str) and f for f in d["files"]):
            raise DamagedTableError(f"{where}: manifest key 'files' is {d['files']!r}, expected a list of file names")
        twice = sorted({f for f in d["files"] if d["files"].count(f) > 1})
        if twice:  # a reader would read that part twice: more rows, or the same count and wrong data
            raise DamagedTableError(f"{where}: the manifest lists file(s) {twice} more than once")
        part_types = {"size": int, "rows": int, "sha256": str}
        for rel, info in d.get("parts", {}).items():
            bad = not isinstance(info, dict) or any(
                info.get(k) is not None and (not isinstance(info[k], t) or isinstance(info[k], bool))
                for k, t in part_types.items())
            if bad:  # rows is null for a part that is not Parquet (an encoder's bytes)
                raise DamagedTableError(f"{where}: manifest part {rel!r} is {info!r}, expected "
                                        "{'size': int, 'sha256': str, 'rows': int or null}")
        if not d["files"] and d["rows"]:
            raise DamagedTableError(f"{where}: the manifest says rows={d['rows']} but names no data files")
        return cls(**d)


class TableWriter:
    """Writes the parts of one table version; ``commit`` makes them visible at once."""

    def __init__(self, store: Store, key: str, stage: str, config: dict, inputs: dict[str, str]):
        self.store, self.key, self.stage = store, key.strip("/"), stage
        self.config, self.inputs = config, inputs
        self.data_dir = f"{self.key}/_data-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.files: list[str] = []
        self.parts: dict[str, dict[str, Any]] = {}  # infos known without reading back (own writes)
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
        self.parts[rel] = self.store.write_parquet(rel, table)
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

    def _part_infos(self) -> dict[str, dict[str, Any]]:
        """Size, sha256 and rows of every part, checking that they are all still there."""
        fs, where = self.store.fs, self.store.uri_of(self.key)
        rels = sorted(self.files)
        for rel, info in zip(rels, fs.get_file_info([self.store.path(r) for r in rels])):
            known = self.parts.get(rel)
            if info.type != pafs.FileType.File or (known is not None and info.size != known["size"]):
                raise DamagedTableError(
                    f"{where}: cannot commit, part {self.store.uri_of(rel)} was deleted or changed while this writer "
                    "ran (another writer's commit collects versions untouched for its grace period, "
                    "DISTCUR_GC_GRACE_S); rerun the stage")
        infos = {}
        for rel in rels:
            try:
                infos[rel] = self.parts.get(rel) or _part_info(fs, self.store.path(rel))
            except PARQUET_READ_ERRORS as e:
                raise DamagedTableError(f"{where}: cannot commit, part {self.store.uri_of(rel)} does not read back "
                                        f"({e}); rerun the stage") from e
        counted = [i["rows"] for i in infos.values()]
        if counted and None not in counted and sum(counted) != self.rows:
            raise ValueError(f"{where}: the writer counted {self.rows} rows but its parts hold {sum(counted)}")
        return infos

    def commit(self, metadata: dict | None = None) -> Manifest:
        """Check the parts, protect the replaced version for the grace period, write the manifest, GC."""
        self.store.touch_version(self.data_dir)
        parts = self._part_infos()
        manifest = Manifest(
            stage=self.stage,
            config=self.config,
            inputs=self.inputs,
            files=sorted(self.files),
            rows=self.rows,
            schema=str(self.schema) if self.schema is not None else "",
            parts=parts,
            metadata=metadata or {},
            wall_s=round(time.time() - self._t0, 3),
        )
        for version in self.store.referenced_versions(self.key):  # readers of the old manifest keep it
            self.store.touch_version(f"{self.key}/{version}")
        self.store.write_text(f"{self.key}/{MANIFEST}", manifest.to_json())
        self.store.gc_versions(self.key, keep=self.data_dir)
        return manifest

    def abort(self) -> None:
        self.store.delete_dir(self.data_dir)


class Store:
    """A store rooted at a local folder or ``s3://bucket/prefix``.

    ``force``: :meth:`is_done` answers False, so every stage run with this store recomputes and
    recommits its outputs (a stage's ``--force``). ``verify_done``: :meth:`is_done` also reads the
    whole output and checks it with :meth:`verify` (a stage's ``--verify``). ``gc_grace_s``: see
    the module docstring.
    """

    def __init__(self, uri: str | os.PathLike, force: bool = False, gc_grace_s: float | None = None,
                 verify_done: bool = False):
        self.uri = str(uri).rstrip("/")
        self.force, self.verify_done = force, verify_done
        self.gc_grace_s = GC_GRACE_S if gc_grace_s is None else float(gc_grace_s)
        self.fs, self.root = resolve(self.uri)
        if isinstance(self.fs, pafs.LocalFileSystem):
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __reduce__(self):  # pyarrow S3 filesystems are re-created from the environment on workers
        return (Store, (self.uri, self.force, self.gc_grace_s, self.verify_done))

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

    def write_parquet(self, rel: str, table: pa.Table) -> dict[str, Any]:
        """Write one Parquet file atomically (with page CRCs, checked on every read); returns its
        {size, sha256, rows} for a manifest."""
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
        data = buf.getvalue().to_pybytes()
        self.write_bytes(rel, data)
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": table.num_rows}

    # -- tables ------------------------------------------------------------------------------
    def manifest(self, key: str) -> Manifest | None:
        """The committed manifest of ``key``, or None when nothing is committed there.

        A manifest that does not parse is a :class:`DamagedTableError` naming its path."""
        rel = f"{key.strip('/')}/{MANIFEST}"
        try:
            text = self.read_text(rel)
        except FileNotFoundError:
            return None
        except OSError as e:  # S3 reports a missing key as OSError
            if "NoSuchKey" in str(e) or "does not exist" in str(e) or "Path does not exist" in str(e):
                return None
            raise
        try:
            return Manifest.from_json(text, where=self.uri_of(rel))
        except DamagedTableError as e:
            raise DamagedTableError(f"{e}; rebuild it by rerunning the stage that writes {key!r} with --force") from None

    def _damage(self, key: str, m: Manifest) -> str | None:
        """What is wrong with the parts of ``m`` by their listing (existence, size, rows), or None."""
        for rel, info in zip(m.files, self.fs.get_file_info([self.path(f) for f in m.files])):
            want = m.parts.get(rel, {}).get("size")
            if info.type != pafs.FileType.File:
                return f"part {self.uri_of(rel)} is missing"
            if want is not None and info.size != want:
                return f"part {self.uri_of(rel)} has {info.size} bytes but the manifest records {want}"
        counted = [m.parts.get(f, {}).get("rows") for f in m.files]
        if m.parts and counted and None not in counted and sum(counted) != m.rows:
            return f"the manifest says rows={m.rows} but records parts of {sum(counted)} rows in all"
        return self._footer_damage(m)

    def _footer_damage(self, m: Manifest) -> str | None:
        """What is wrong with the Parquet footers of ``m``'s parts (unreadable, another row count,
        other columns than the manifest's schema), or None. One small read per part: damage that
        keeps a part's size is found here; a changed data page only by :meth:`verify`'s checksums."""
        columns = schema_columns(m.schema)
        for rel in m.files:
            if not rel.endswith(".parquet"):
                continue
            try:
                meta = pq.read_metadata(self.path(rel), filesystem=self.fs)
            except PARQUET_READ_ERRORS as e:
                if not _is_damage(e):
                    raise
                return f"part {self.uri_of(rel)} has an unreadable Parquet footer ({e})"
            want = m.parts.get(rel, {}).get("rows")
            if want is not None and meta.num_rows != want:
                return f"part {self.uri_of(rel)}'s footer says {meta.num_rows} rows but the manifest records {want}"
            got = meta.schema.to_arrow_schema().names
            if columns and got != columns:
                return f"part {self.uri_of(rel)} has columns {got} but the manifest's schema has {columns}"
        return None

    def is_done(self, key: str, stage: str, config: dict, inputs: dict[str, str]) -> bool:
        """True when ``key`` holds an intact output of this stage made from the same config and inputs.

        A damaged output (unreadable manifest, a part missing or of another size) is not done: the
        stage logs why and rebuilds it. Always False on a store opened with ``force``; on one opened
        with ``verify_done`` every part is also read and checked (sha256, rows)."""
        if self.force:
            return False
        try:
            m = self.manifest(key)
        except DamagedTableError as e:
            log.warning("%s: rebuilding it", e)
            return False
        probe = Manifest(stage=stage, config=json.loads(json.dumps(config, default=str)), inputs=inputs,
                         files=[], rows=0)
        if m is None or m.fingerprint != probe.fingerprint:
            return False
        damage = self._damage(key, m) or (self.verify_done and "; ".join(self.verify(key)))
        if damage:
            log.warning("%s: %s: rebuilding it", self.uri_of(key), damage)
        return not damage

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

    def _intact_manifest(self, key: str) -> Manifest:
        """The manifest of ``key``; an error naming key and file when a part is missing or truncated."""
        m = self.manifest(key)
        if m is None:
            raise FileNotFoundError(f"no committed table at {self.uri_of(key)} (missing {MANIFEST})")
        damage = self._damage(key, m)
        if damage:
            raise DamagedTableError(f"{self.uri_of(key)}: {damage}; {_rebuild_hint(m.stage)}")
        return m

    def files(self, key: str) -> list[str]:
        return [self.path(f) for f in self._intact_manifest(key).files]

    def _unreadable(self, key: str, m: Manifest, error: Exception) -> Exception:
        """The error for a table whose Parquet did not read, naming the first part that does not read
        (S3 and network errors are passed on as they are)."""
        if not _is_damage(error):
            return error
        bad = "one of its parts"
        for rel in m.files:
            try:
                pq.read_table(self.path(rel), filesystem=self.fs, page_checksum_verification=True)
            except PARQUET_READ_ERRORS:
                bad = self.uri_of(rel)
                break
        return DamagedTableError(f"{self.uri_of(key)}: cannot read {bad} ({error}); {_rebuild_hint(m.stage)}")

    def _check_columns(self, key: str, m: Manifest, columns: list[str] | None) -> None:
        """A column the table does not have is the caller's mistake, not damage: say which."""
        have = schema_columns(m.schema)
        missing = [c for c in columns or () if have and c not in have]
        if missing:
            raise ValueError(f"{self.uri_of(key)} (written by '{m.stage}') has no column(s) {missing}; "
                             f"its columns: {have}")

    def read_table(self, key: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        m = self._intact_manifest(key)
        self._check_columns(key, m, columns)
        if not m.files:
            raise FileNotFoundError(f"table {self.uri_of(key)} has no data files")
        paths = [self.path(f) for f in m.files]
        try:
            table = pq.ParquetDataset(paths, filesystem=self.fs, filters=filters, partitioning=None,
                                      page_checksum_verification=True).read(columns=columns)
        except PARQUET_READ_ERRORS as e:
            raise self._unreadable(key, m, e) from e
        if filters is None and table.num_rows != m.rows:
            raise DamagedTableError(f"{self.uri_of(key)}: its parts hold {table.num_rows} rows but the manifest "
                                    f"says rows={m.rows}; {_rebuild_hint(m.stage)}")
        return table

    def iter_batches(self, key: str, columns: list[str] | None = None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Stream a table part by part (bounded memory)."""
        m = self._intact_manifest(key)
        self._check_columns(key, m, columns)
        for rel in m.files:
            try:
                pf = pq.ParquetFile(self.fs.open_input_file(self.path(rel)), page_checksum_verification=True)
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)
            except PARQUET_READ_ERRORS as e:
                if not _is_damage(e):
                    raise
                raise DamagedTableError(f"{self.uri_of(key)}: cannot read {self.uri_of(rel)} ({e}); "
                                        f"{_rebuild_hint(m.stage)}") from e

    def input_fingerprint(self, key: str) -> str:
        """Fingerprint of a committed input, for a downstream stage's manifest."""
        m = self.manifest(key)
        if m is None:
            raise FileNotFoundError(f"input {self.uri_of(key)} is not a committed table")
        return m.fingerprint

    # -- integrity ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every committed key of the store (the folders holding a ``manifest.json``)."""
        sel = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(sel):
            rel = info.path[len(self.root):].strip("/")
            if info.base_name == MANIFEST and "/_data-" not in f"/{rel}":
                found.append(rel[: -len(MANIFEST)].strip("/"))
        return sorted(found)

    def verify(self, key: str) -> list[str]:
        """Problems of one committed table, reading all of its data: every part present with its
        recorded size and sha256, readable, with its recorded rows, and rows summing to the
        manifest's. Empty when intact. Layout 1 manifests (no sizes) are checked for rows only."""
        try:
            m = self.manifest(key)
        except DamagedTableError as e:
            return [str(e)]
        if m is None:
            return [f"no committed table at {self.uri_of(key)} (missing {MANIFEST})"]
        problems, total = [], 0
        for rel, info in zip(m.files, self.fs.get_file_info([self.path(f) for f in m.files])):
            want, where = m.parts.get(rel, {}), self.uri_of(rel)
            if info.type != pafs.FileType.File:
                problems.append(f"{where}: missing")
                continue
            got = {"size": info.size, "sha256": _sha256_of(self.fs, self.path(rel)), "rows": None}
            if rel.endswith(".parquet"):
                try:
                    got["rows"] = pq.read_metadata(self.path(rel), filesystem=self.fs).num_rows
                except PARQUET_READ_ERRORS as e:
                    problems.append(f"{where}: unreadable Parquet ({e})")
            for what in ("size", "sha256", "rows"):
                if want.get(what) is not None and got[what] is not None and got[what] != want[what]:
                    problems.append(f"{where}: {what} is {got[what]} but the manifest records {want[what]}")
            total += got["rows"] or 0
        parquet = [f for f in m.files if f.endswith(".parquet")]
        if not problems and parquet and total != m.rows:
            problems.append(f"{self.uri_of(key)}: its parts hold {total} rows but the manifest says rows={m.rows}")
        return [f"{p}; {_rebuild_hint(m.stage)}" for p in problems]

    # -- garbage collection ------------------------------------------------------------------
    def referenced_versions(self, key: str) -> set[str]:
        """The ``_data-*`` versions the current manifest of ``key`` names (none when unreadable)."""
        try:
            m = self.manifest(key)
        except DamagedTableError:
            return set()
        prefix = f"{key.strip('/')}/"
        return {f[len(prefix):].split("/", 1)[0] for f in m.files if f.startswith(prefix)} if m else set()

    def touch_version(self, data_dir: str) -> None:
        """Mark a version as in use now: no commit collects it within the grace period."""
        self.write_text(f"{data_dir}/{ALIVE}", f"{time.time():.3f}")

    def _last_write(self, data_dir: str) -> float | None:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(data_dir), recursive=True, allow_not_found=True))
        stamps = [i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File and i.mtime is not None]
        return max(stamps, default=None)

    def gc_versions(self, key: str, keep: str, grace_s: float | None = None) -> list[str]:
        """Delete the versions of ``key`` that are neither ``keep`` nor referenced by its current
        manifest and had nothing written for ``grace_s`` (default: the store's grace period), so
        no live writer's or recent reader's version is deleted. Returns the deleted versions."""
        grace = self.gc_grace_s if grace_s is None else grace_s
        key = key.strip("/")
        kept = {keep.rsplit("/", 1)[-1], *self.referenced_versions(key)}
        now, deleted = time.time(), []
        for name in self.listdir(key):
            if not name.startswith("_data-") or name in kept:
                continue
            last = self._last_write(f"{key}/{name}")
            if last is None or now - last >= grace:
                self.delete_dir(f"{key}/{name}")
                deleted.append(name)
        return deleted
