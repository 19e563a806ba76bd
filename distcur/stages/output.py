"""The one way a stage commits its output: skip when current, else write, commit, or abort.

Every stage output is a table version with a manifest that records the stage, its config and the
fingerprints of its inputs. :func:`commit_output` is the whole protocol:

- the store already holds an intact output of this stage made from the same config and inputs
  (``Store.is_done``): nothing runs, the committed manifest is returned;
- otherwise ``produce(writer)`` writes the parts (``writer.write(table)`` or, for parts written by
  workers under ``writer.data_dir``, ``writer.add_files``) and returns the manifest's metadata;
  the writer commits, so readers see the new version at once;
- anything raised on the way (a bad input, Ctrl-C, a lost worker) aborts the writer: its parts are
  deleted and the previous version stays what readers see.

:func:`commit_files` is the same commit for files a stage writes at fixed paths under its key
(a trained policy's ``policy.pt``, which users and tools address by name, not per version): the
stage has checked ``Store.is_done`` before its work, writes the files (each atomically), and the
manifest written last is their done bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from distcur.store import MANIFEST, Manifest, Store, TableWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """A stage's committed output: its manifest, and whether this call only found it current."""

    key: str
    manifest: Manifest
    skipped: bool


def commit_output(store: Store, key: str, stage: str, config: dict, inputs: dict[str, str],
                  produce: Callable[[TableWriter], dict | None], *, force: bool = False,
                  quiet: bool = False) -> Output:
    """Skip ``key`` when current; else ``produce(writer)`` and commit, aborting on any exception.

    ``force`` rebuilds even a current output (as a store opened with ``force`` does).
    """
    if not force and store.is_done(key, stage, config, inputs):
        if not quiet:
            log.info("%s is up to date", key)
        return Output(key, store.manifest(key), skipped=True)
    writer = store.writer(key, stage, config, inputs)
    try:
        metadata = produce(writer)
        manifest = writer.commit(metadata)
    except BaseException:
        writer.abort()
        raise
    return Output(key, manifest, skipped=False)


def commit_table(store: Store, key: str, stage: str, config: dict, inputs: dict[str, str],
                 make: Callable[[], tuple[pa.Table, dict | None]], *, force: bool = False,
                 quiet: bool = False, rows_per_part: int = 1_000_000) -> Output:
    """:func:`commit_output` for a stage whose output is one in-memory table: ``make()`` returns
    ``(table, metadata)`` and is called only when the output is not current."""

    def produce(writer: TableWriter) -> dict | None:
        table, metadata = make()
        if table.num_rows == 0:
            writer.write(table)
        for start in range(0, table.num_rows, rows_per_part):
            writer.write(table.slice(start, rows_per_part))
        return metadata

    return commit_output(store, key, stage, config, inputs, produce, force=force, quiet=quiet)


def commit_files(store: Store, key: str, stage: str, config: dict, inputs: dict[str, str], files: list[str],
                 rows: int, metadata: dict | None = None, wall_s: float = 0.0) -> Manifest:
    """Commit ``files`` (already written at fixed paths under ``key``) with ``key``'s manifest,
    written last: until it exists, the output is not done and a rerun redoes it."""
    missing = [f for f in files if not store.exists(f)]
    if missing:
        raise FileNotFoundError(f"{key}: cannot commit {missing}: not written")
    manifest = Manifest(stage=stage, config=config, inputs=dict(inputs), files=list(files), rows=int(rows),
                        metadata=dict(metadata or {}), wall_s=round(wall_s, 3))
    store.write_text(f"{key}/{MANIFEST}", manifest.to_json())
    return manifest
