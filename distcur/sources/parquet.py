"""A user's own step table (Parquet or Arrow IPC / Feather, one file or a folder) into the canonical one.

Columns are mapped to the canonical names with ``--map canonical=spec``: a spec is one column
(``state=obs.state``, a list column for a vector) or several scalar columns joined by commas
(``state=x,y,z``). ``episode`` (integers, unique within the source), ``state`` and ``action`` are
required; ``step`` orders the rows of an episode (default: their order in the file); ``task``,
``reward``, ``image``, ``is_terminal`` and ``success`` are optional. ``is_first`` / ``is_last``
are derived from the episode boundaries. An episode must lie in one file. Errors name the file,
the canonical column and the user's column it is mapped from.

One shard per file (:func:`plan_parquet`, :func:`ingest_parquet_file`); the stage
:func:`distcur.stages.ingest.run_parquet` maps them (Ray Data for several files, or in-process
with the same output) and commits the table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distcur.fs import resolve
from distcur.schema import STEP_SCHEMA, StepValidationError
from distcur.sources.common import PartWriter, ShardResult, Sink, SourceFormatError, episode_flags

STAGE = "ingest-parquet"
REQUIRED = ("episode", "state", "action")
MAPPABLE = ("episode", "step", "task", "state", "action", "image", "reward", "is_terminal", "success")
VECTORS = ("state", "action")
SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")


def parse_mapping(items: list[str] | dict[str, str]) -> dict[str, tuple[str, ...]]:
    """``["state=obs.state", "action=a0,a1"]`` -> {canonical: (user columns...)}; checks names."""
    pairs = items.items() if isinstance(items, dict) else [i.split("=", 1) if "=" in i else (i, "") for i in items]
    out: dict[str, tuple[str, ...]] = {}
    for canonical, spec in pairs:
        canonical = canonical.strip()
        if canonical not in MAPPABLE:
            raise ValueError(f"--map {canonical}={spec}: unknown canonical column {canonical!r}; "
                             f"one of {list(MAPPABLE)} (is_first/is_last are derived)")
        cols = tuple(c.strip() for c in spec.split(",") if c.strip())
        if not cols:
            raise ValueError(f"--map {canonical}=: name the column(s), e.g. {canonical}=my_column")
        if len(cols) > 1 and canonical not in VECTORS:
            raise ValueError(f"--map {canonical}={spec}: only state and action may join several columns")
        out[canonical] = cols
    missing = [c for c in REQUIRED if c not in out]
    if missing:
        raise ValueError(f"--map must map {missing} (e.g. episode=ep_id state=obs.state action=act)")
    return out


def list_files(path: str) -> list[str]:
    """The table files of ``path``: itself, or the Parquet/Arrow files under a folder, sorted."""
    fs, root = resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise SourceFormatError(f"{path}: no such file or folder")
    base = path.rstrip("/")
    if info.type == pafs.FileType.File:
        return [base]
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(SUFFIXES) and "/_" not in i.path[len(root):]
                   and "/." not in i.path[len(root):])
    if not found:
        raise SourceFormatError(f"{path}: the folder holds no {'/'.join(SUFFIXES)} files")
    return [base + p[len(root):] for p in found]


def read_file(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    try:
        if uri.endswith(".parquet"):
            return pq.read_table(path, filesystem=fs, columns=columns)
        import pyarrow.feather as feather

        with fs.open_input_file(path) as f:
            return feather.read_table(f, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceFormatError(f"{uri}: not a readable {'Parquet' if uri.endswith('.parquet') else 'Arrow'} "
                                f"file ({e})") from e


def _describe(canonical: str, mapping: dict) -> str:
    return f"column {canonical!r} (from {','.join(mapping[canonical])!r})"


def _vector(table: pa.Table, canonical: str, mapping: dict, uri: str) -> np.ndarray:
    cols = mapping[canonical]
    parts = []
    for c in cols:
        col = table.column(c)
        if col.null_count:
            row = int(np.argmax(~col.is_valid().to_numpy(zero_copy_only=False)))
            raise SourceFormatError(f"{uri}: {_describe(canonical, mapping)}: null in column {c!r} at row {row}")
        t = col.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            arr = col.combine_chunks()
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            if len(lengths) and lengths.min() != lengths.max():
                row = int(np.argmax(lengths != lengths[0]))
                raise SourceFormatError(f"{uri}: {_describe(canonical, mapping)}: list column {c!r} has length "
                                        f"{lengths[row]} at row {row}, expected {lengths[0]} like row 0")
            values = arr.flatten()
            if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
                raise SourceFormatError(f"{uri}: {_describe(canonical, mapping)}: column {c!r} holds {values.type}, "
                                        "expected numbers")
            parts.append(values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), -1))
        elif pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t):
            parts.append(col.to_numpy().astype(np.float32).reshape(-1, 1))
        else:
            raise SourceFormatError(f"{uri}: {_describe(canonical, mapping)}: column {c!r} is {t}, expected a list "
                                    "of numbers or a numeric scalar")
    return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class FileShard:
    uri: str
    index: int


def ingest_parquet_file(shard: FileShard, mapping: dict, source: str, sink: Sink,
                        rows_per_part: int = 100_000) -> ShardResult:
    """Map, check and order the episodes of one file, handing its parts to ``sink``."""
    uri = shard.uri
    needed = sorted({c for cols in mapping.values() for c in cols})
    if uri.endswith(".parquet"):  # check the names from the footer before reading any data
        fs, local = resolve(uri)
        try:
            names = pq.read_schema(local, filesystem=fs).names
        except (pa.ArrowInvalid, OSError) as e:
            raise SourceFormatError(f"{uri}: not a readable Parquet file ({e})") from e
        missing = [c for c in needed if c not in names]
        if missing:
            raise SourceFormatError(f"{uri}: missing column(s) {missing} named by --map; the file has {names}")
        table = read_file(uri, columns=needed)
    else:
        table = read_file(uri)
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise SourceFormatError(f"{uri}: missing column(s) {missing} named by --map; the file has "
                                    f"{table.column_names}")
        table = table.select(needed)
    if table.num_rows == 0:
        raise SourceFormatError(f"{uri}: empty file (0 rows)")
    ep_col = table.column(mapping["episode"][0])
    if not pa.types.is_integer(ep_col.type) or ep_col.null_count:
        raise SourceFormatError(f"{uri}: {_describe('episode', mapping)} is {ep_col.type} with {ep_col.null_count} "
                                "nulls; expected integer episode ids")
    episode = ep_col.to_numpy().astype(np.int64)
    if "step" in mapping:
        st = table.column(mapping["step"][0])
        if not pa.types.is_integer(st.type) or st.null_count:
            raise SourceFormatError(f"{uri}: {_describe('step', mapping)} is {st.type}; expected integer steps")
        step = st.to_numpy().astype(np.int64)
    else:
        step = np.zeros(len(episode), np.int64)
    order = np.lexsort((np.arange(len(episode)), step, episode))  # stable: file order within an episode
    table, episode = table.take(pa.array(order)), episode[order]
    state = _vector(table, "state", mapping, uri)
    action = _vector(table, "action", mapping, uri)
    if "step" in mapping:
        step = step[order]
    optional = {}
    for name in ("task", "reward", "image", "is_terminal", "success"):
        if name in mapping:
            col = table.column(mapping[name][0]).combine_chunks()
            want = STEP_SCHEMA.field(name).type
            try:
                optional[name] = col.cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SourceFormatError(f"{uri}: {_describe(name, mapping)} is {col.type}, which does not convert "
                                        f"to {want} ({e})") from e
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    ends = np.r_[starts[1:], len(episode)]
    writer = PartWriter(sink, shard.index, uri, rows_per_part)
    info = {}
    for s, e in zip(starts, ends):
        eid, t = int(episode[s]), int(e - s)
        where = f"{uri}, episode {eid}"
        if "step" in mapping and not np.array_equal(step[s:e], np.arange(t)):
            bad = int(np.argmax(step[s:e] != np.arange(t)))
            raise SourceFormatError(f"{where}: {_describe('step', mapping)} is {int(step[s + bad])} at position {bad}; "
                                    f"expected steps 0..{t - 1} (each once)")
        first, last = episode_flags(t)
        cols = {"source": source, "episode": np.full(t, eid, np.int64), "step": np.arange(t, dtype=np.int32),
                "state": state[s:e], "action": action[s:e], "is_first": first, "is_last": last,
                "is_terminal": np.zeros(t, bool)}
        for name, arr in optional.items():
            piece = arr.slice(s, t)
            if name == "is_terminal":
                piece = piece.fill_null(False)
            cols[name] = piece.to_pylist()
        try:
            writer.add(cols, where)
        except StepValidationError as err:
            raise StepValidationError(_with_user_column(str(err), mapping)) from None
        info[str(eid)] = {"file": uri, "steps": t}
    try:
        result = writer.result(episode_info=info)
    except StepValidationError as err:
        raise StepValidationError(_with_user_column(str(err), mapping)) from None
    return result


def _with_user_column(message: str, mapping: dict) -> str:
    for canonical, cols in mapping.items():
        if f"column={canonical!r}" in message or f"column {canonical!r}" in message:
            return f"{message} (mapped from your column {','.join(cols)!r})"
    return message


@dataclass
class ParquetPlan:
    """The table files of one ingest (one shard each) and their sizes."""

    uri: str
    files: list[str]
    sizes: dict[str, int]
    shards: list[FileShard]

    def identity(self) -> dict:
        """Identity of the input files (what the stage fingerprints): their sizes."""
        return {"files": self.sizes}


def plan_parquet(path: str) -> ParquetPlan:
    """The files of ``path`` (a file or a folder), their sizes, one shard each."""
    uri = str(path) if "://" in str(path) else os.path.abspath(str(path))
    files = list_files(uri)
    fs, _ = resolve(uri)
    sizes = {f: int(i.size) for f, i in zip(files, fs.get_file_info([resolve(f)[1] for f in files]))}
    return ParquetPlan(uri=uri, files=files, sizes=sizes, shards=[FileShard(uri=f, index=i) for i, f in enumerate(files)])


def parquet_metadata(plan: ParquetPlan, mapping: dict, results: list[ShardResult]) -> dict:
    """The source's manifest fields besides the merged dims and action statistics; an episode found
    in two files is an error naming both."""
    owner: dict[str, str] = {}
    for r in results:
        for eid in r.episode_info:
            if eid in owner:
                raise SourceFormatError(f"episode {eid} is in two files, {owner[eid]} and {r.uri}: an episode must "
                                        f"lie in one file (and ids be unique within the source)")
            owner[eid] = r.uri
    return {"format": "parquet", "path": plan.uri, "files": plan.files, "map": {k: list(v) for k, v in mapping.items()},
            "episode_info": {k: v for r in results for k, v in r.episode_info.items()}}
