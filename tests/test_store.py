"""The Store API on a local folder and on S3 (moto's server on loopback): same behaviour on both."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet
import pytest

from distcur import __version__
from distcur.store import LAYOUT_VERSION, MANIFEST, DamagedTableError, Store, fingerprint, resolve

KEY = "steps/source=demo"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return Store(f"{bucket}/prefix")


def table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"episode": pa.array(range(offset, offset + n), pa.int64()),
                     "x": pa.array([float(i) / 3 for i in range(offset, offset + n)], pa.float32())})


def data_versions(store: Store, key: str = KEY) -> list[str]:
    return [n for n in store.listdir(key) if n.startswith("_data-")]


def test_write_read_and_manifest(store):
    t = table(10)
    m = store.write_table(KEY, t, stage="test", config={"b": 1, "a": [1, 2]}, inputs={"in": "abc"},
                          metadata={"demo": {"rows": 10}}, rows_per_part=4)
    assert store.read_table(KEY).equals(t)
    assert store.read_table(KEY, columns=["x"]).column_names == ["x"]
    assert store.read_table(KEY, filters=[("episode", ">=", 7)]).num_rows == 3
    assert len(m.files) == 3 and all(f.startswith(f"{KEY}/_data-") for f in m.files)
    on_disk = store.manifest(KEY)
    assert on_disk.to_json() == m.to_json()
    assert (on_disk.rows, on_disk.stage, on_disk.inputs) == (10, "test", {"in": "abc"})
    assert on_disk.config == {"b": 1, "a": [1, 2]} and on_disk.metadata == {"demo": {"rows": 10}}
    assert on_disk.distcur_version == __version__ and on_disk.layout_version == LAYOUT_VERSION
    assert on_disk.wall_s >= 0 and "episode: int64" in on_disk.schema
    assert json.loads(store.read_text(f"{KEY}/{MANIFEST}"))["fingerprint"] == m.fingerprint
    batches = list(store.iter_batches(KEY, batch_size=3))
    assert pa.Table.from_batches(batches).equals(t)
    assert store.files(KEY) == [store.path(f) for f in m.files]


def test_writer_parts_invisible_until_commit(store):
    w = store.writer(KEY, "test", {"k": 1}, {"in": "x"})
    w.write(table(3))
    w.write(table(2, offset=3).to_batches()[0])
    assert store.manifest(KEY) is None
    with pytest.raises(FileNotFoundError, match="no committed table at .*steps/source=demo"):
        store.read_table(KEY)
    with pytest.raises(ValueError, match="part 2 has schema"):
        w.write(pa.table({"other": [1]}))
    with pytest.raises(ValueError, match="is not under this writer's data dir"):
        w.add_files(["elsewhere/part-00000.parquet"], rows=1)
    m = w.commit({"note": "two parts"})
    assert m.rows == 5 and len(m.files) == 2
    assert store.read_table(KEY).equals(table(5))


def test_resume_by_config_and_inputs(store):
    store.write_table(KEY, table(4), stage="test", config={"a": 1, "b": 2}, inputs={"in": "v1"})
    assert store.is_done(KEY, "test", {"b": 2, "a": 1}, {"in": "v1"})  # key order does not matter
    assert not store.is_done(KEY, "test", {"a": 1, "b": 3}, {"in": "v1"})
    assert not store.is_done(KEY, "test", {"a": 1, "b": 2}, {"in": "v2"})
    assert not store.is_done(KEY, "other-stage", {"a": 1, "b": 2}, {"in": "v1"})
    assert not store.is_done("steps/source=missing", "test", {}, {})
    fp = store.input_fingerprint(KEY)
    assert fp == store.manifest(KEY).fingerprint
    with pytest.raises(FileNotFoundError, match="is not a committed table"):
        store.input_fingerprint("steps/source=missing")


def test_failed_rewrite_leaves_previous_output_intact(store):
    first = store.write_table(KEY, table(6), stage="test", config={"v": 1})
    w = store.writer(KEY, "test", {"v": 2})
    try:
        w.write(table(100))
        raise RuntimeError("stage crashed after writing a part")
    except RuntimeError:
        w.abort()
    assert store.manifest(KEY).to_json() == first.to_json()
    assert store.read_table(KEY).equals(table(6))
    assert data_versions(store) == [first.files[0].split("/")[2]]
    # a crash without abort leaves an orphan version that no reader sees; the next commit collects it
    orphan = store.writer(KEY, "test", {"v": 3})
    orphan.write(table(50))
    assert store.read_table(KEY).equals(table(6))
    second = store.write_table(KEY, table(2), stage="test", config={"v": 4})
    assert store.read_table(KEY).equals(table(2))
    # within the grace period nothing is collected (the orphan might be a live writer, the first
    # version might still be read); after it, everything but the current version goes
    assert len(data_versions(store)) == 3
    assert store.gc_versions(KEY, keep=second.files[0], grace_s=0) != []
    assert data_versions(store) == [second.files[0].split("/")[2]]


def test_writer_error_midway_aborts(store):
    first = store.write_table(KEY, table(3), stage="test")
    w = store.writer(KEY, "test", {"v": 2})
    w.write(table(2))
    with pytest.raises(ValueError, match="part 1 has schema"):
        w.write(pa.table({"episode": pa.array([1], pa.int32())}))
    w.abort()
    assert store.manifest(KEY).to_json() == first.to_json()
    assert store.read_table(KEY).equals(table(3))
    assert len(data_versions(store)) == 1


def test_raw_objects_and_paths(store):
    store.write_text("notes/a.txt", "hello")
    store.write_bytes("notes/b.bin", b"\x00\x01")
    assert store.exists("notes/a.txt") and not store.exists("notes/c.txt")
    assert store.read_text("notes/a.txt") == "hello" and store.read_bytes("notes/b.bin") == b"\x00\x01"
    assert store.listdir("notes") == ["a.txt", "b.bin"]
    assert store.listdir("nothing-here") == []
    store.write_text("notes/a.txt", "replaced")
    assert store.read_text("notes/a.txt") == "replaced"
    store.delete_dir("notes")
    assert not store.exists("notes/a.txt")
    assert store.uri_of("steps/x") == f"{store.uri}/steps/x"
    clone = pickle.loads(pickle.dumps(store))  # workers re-create the filesystem from the URI
    clone.write_text("from-clone.txt", "x")
    assert store.read_text("from-clone.txt") == "x"


def test_uris_and_fingerprint(tmp_path):
    with pytest.raises(ValueError, match="unsupported store URI 'gs://b/p'"):
        resolve("gs://b/p")
    fs, path = resolve(f"file://{tmp_path}")
    assert path == str(tmp_path)
    assert Store(f"{tmp_path}/x/").uri == f"{tmp_path}/x"
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


# -- integrity: manifests record sizes, checksums and rows; damage is noticed and named ---------------
def rewrite_manifest(store: Store, key: str = KEY, **changes) -> None:
    d = json.loads(store.read_text(f"{key}/{MANIFEST}"))
    d.update(changes)
    store.write_text(f"{key}/{MANIFEST}", json.dumps(d))


def overwrite_part(store: Store, rel: str, data: bytes) -> None:
    store.write_bytes(rel, data)


def test_manifest_records_parts(store):
    m = store.write_table(KEY, table(10), stage="test", rows_per_part=4)
    assert sorted(m.parts) == m.files
    for rel in m.files:
        data = store.read_bytes(rel)
        assert m.parts[rel]["size"] == len(data)
        assert m.parts[rel]["sha256"] == hashlib.sha256(data).hexdigest()
    assert [m.parts[f]["rows"] for f in m.files] == [4, 4, 2]
    assert store.manifest(KEY).parts == m.parts
    # parts written elsewhere (Ray tasks) are measured at commit
    w = store.writer(KEY, "test", {"v": 2})
    rel = f"{w.data_dir}/part-00000.parquet"
    store.write_parquet(rel, table(3))
    w.add_files([rel], rows=3)
    assert w.commit().parts[rel]["rows"] == 3
    w = store.writer(KEY, "test", {"v": 3})
    store.write_parquet(rel := f"{w.data_dir}/part-00000.parquet", table(3))
    w.add_files([rel], rows=4)
    with pytest.raises(ValueError, match="the writer counted 4 rows but its parts hold 3"):
        w.commit()
    assert store.verify(KEY) == [] and KEY in store.keys()


def test_damage_is_noticed_and_named(store):
    cfg = {"v": 1}
    m = store.write_table(KEY, table(10), stage="test", config=cfg, rows_per_part=4)
    part = m.files[1]
    good = store.read_bytes(part)
    assert store.is_done(KEY, "test", cfg, {})
    assert not Store(store.uri, force=True).is_done(KEY, "test", cfg, {})

    overwrite_part(store, part, good[: len(good) // 2])  # truncated
    assert not store.is_done(KEY, "test", cfg, {})
    with pytest.raises(DamagedTableError, match=f"{re.escape(store.uri_of(part))} has {len(good) // 2} bytes but "
                                                f"the manifest records {len(good)}.*'test'.* --force"):
        store.read_table(KEY)
    assert any("unreadable Parquet" in p for p in store.verify(KEY))

    overwrite_part(store, part, good[:-9] + b"x" * 9)  # same size, broken footer: each part's footer is read
    assert not store.is_done(KEY, "test", cfg, {})
    footer = f"{re.escape(store.uri_of(part))} has an unreadable Parquet footer"
    with pytest.raises(DamagedTableError, match=footer):
        store.read_table(KEY)
    with pytest.raises(DamagedTableError, match=footer):
        list(store.iter_batches(KEY))

    # same size, a column renamed in the footer: it would read, as another table
    start = len(good) - int.from_bytes(good[-8:-4], "little") - 8
    overwrite_part(store, part, good[:start] + good[start:].replace(b"episode", b"epizode"))
    assert pa.parquet.read_table(store.path(part), filesystem=store.fs).column_names == ["epizode", "x"]
    assert not store.is_done(KEY, "test", cfg, {})
    with pytest.raises(DamagedTableError, match=r"has columns \['epizode', 'x'\] but the manifest's schema has "
                                                r"\['episode', 'x'\]"):
        store.read_table(KEY)

    # same size, a flipped byte in a data page: the page CRC (on read) and the sha256 (verify) tell
    at = pa.parquet.read_metadata(pa.BufferReader(good)).row_group(0).column(1).data_page_offset + 1
    overwrite_part(store, part, good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:])
    assert any(f"{store.uri_of(part)}: sha256 is" in p for p in store.verify(KEY))
    with pytest.raises(DamagedTableError, match=f"cannot read {re.escape(store.uri_of(part))}"):
        store.read_table(KEY)
    with pytest.raises(DamagedTableError, match=f"cannot read {re.escape(store.uri_of(part))}"):
        list(store.iter_batches(KEY))

    overwrite_part(store, part, good)
    store.fs.delete_file(store.path(m.files[2]))
    assert not store.is_done(KEY, "test", cfg, {})
    with pytest.raises(DamagedTableError, match=f"{re.escape(store.uri_of(m.files[2]))} is missing"):
        store.files(KEY)
    assert store.verify(KEY) == [f"{store.uri_of(m.files[2])}: missing; rebuild it by rerunning the stage that "
                                 "wrote it ('test') with --force"]

    store.write_table(KEY, table(10), stage="test", config=cfg)
    rewrite_manifest(store, rows=11)
    assert not store.is_done(KEY, "test", cfg, {})
    with pytest.raises(DamagedTableError, match="says rows=11 but records parts of 10 rows"):
        store.read_table(KEY)
    assert any("parts hold 10 rows but the manifest says rows=11" in p for p in store.verify(KEY))


@pytest.mark.parametrize("text, error", [
    ("{not json", "invalid manifest JSON"),
    ("[1, 2]", "a manifest must be a JSON object"),
    (None, r"unknown manifest key\(s\) \['colour'\]"),
    ('{"stage": "test"}', r"manifest lacks key\(s\) \['config', 'files', 'inputs', 'rows'\]"),
    ('{"stage": "test", "config": {}, "inputs": {}, "files": [], "rows": "ten"}', "manifest key 'rows' is 'ten', expected an int"),
])
def test_bad_manifest_names_its_path_and_is_rebuilt(store, text, error):
    store.write_table(KEY, table(3), stage="test")
    if text is None:
        rewrite_manifest(store, colour="red")
    else:
        store.write_text(f"{KEY}/{MANIFEST}", text)
    where = re.escape(store.uri_of(f"{KEY}/{MANIFEST}"))
    with pytest.raises(DamagedTableError, match=f"{where}: {error}.*rerunning the stage that writes .* --force"):
        store.manifest(KEY)
    with pytest.raises(DamagedTableError, match=where):
        store.input_fingerprint(KEY)
    assert not store.is_done(KEY, "test", {}, {})  # the stage reruns and overwrites it
    assert store.verify(KEY)[0].startswith(store.uri_of(f"{KEY}/{MANIFEST}"))
    store.write_table(KEY, table(3), stage="test")
    assert store.is_done(KEY, "test", {}, {})


def test_layout_1_manifest_still_loads(store):
    m = store.write_table(KEY, table(5), stage="test", config={"v": 1})
    d = json.loads(m.to_json())
    del d["parts"]
    d["layout_version"] = 1
    store.write_text(f"{KEY}/{MANIFEST}", json.dumps(d))
    assert store.manifest(KEY).parts == {} and store.is_done(KEY, "test", {"v": 1}, {})
    assert store.read_table(KEY).equals(table(5)) and store.verify(KEY) == []
    store.fs.delete_file(store.path(m.files[0]))
    assert not store.is_done(KEY, "test", {"v": 1}, {})  # existence is checked without sizes too


# -- several writers and readers of one key ----------------------------------------------------------
def test_reader_keeps_the_version_a_commit_replaces(store):
    store.write_table(KEY, table(6), stage="test", config={"v": 1})
    paths = store.files(KEY)  # a reader has read the manifest...
    store.write_table(KEY, table(2), stage="test", config={"v": 2})  # ...when another commit lands
    assert pa.concat_tables(pa.parquet.read_table(p, filesystem=store.fs) for p in paths).equals(table(6))
    assert store.read_table(KEY).equals(table(2))


WRITER = """
import json, os, sys, time
import pyarrow as pa
from distcur.store import Store
uri, key, rows, ready, go = sys.argv[1:6]
store = Store(uri)
w = store.writer(key, "test", {"rows": int(rows)})
w.write(pa.table({"x": list(range(int(rows)))}))
open(ready, "w").close()
while go != "-" and not os.path.exists(go):
    time.sleep(0.02)
w.write(pa.table({"x": [-1]}))
print(json.dumps({"rows": w.commit().rows}))
"""


def writer_process(store: Store, rows: int, ready, go=None, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, store.uri, KEY, str(rows), str(ready), str(go or "-")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, **(env or {})})


def wait_for(path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("grace", [None, "0"])
def test_concurrent_writers_in_processes(store, tmp_path, grace):
    """A writes a part and stalls; B writes and commits a whole table (its commit runs the GC);
    A writes another part and commits. With the grace period A's version survives and A's commit
    wins; with no grace B collects A's live version and A's commit refuses. Never a broken table."""
    a = writer_process(store, 10, tmp_path / "a-ready", tmp_path / "a-go")
    wait_for(tmp_path / "a-ready", a)
    b = writer_process(store, 5, tmp_path / "b-ready", env={"DISTCUR_GC_GRACE_S": grace} if grace else None)
    assert b.wait(60) == 0, b.communicate()
    assert store.read_table(KEY).num_rows == 6
    (tmp_path / "a-go").touch()
    out, err = a.communicate(timeout=60)
    if grace is None:
        assert a.returncode == 0, err
        assert json.loads(out)["rows"] == 11 and store.read_table(KEY).num_rows == 11
        assert len(data_versions(store)) == 2  # B's version stays for readers of its manifest
    else:
        assert a.returncode != 0 and "DamagedTableError" in err and "cannot commit, part" in err
        assert store.read_table(KEY).num_rows == 6
    assert store.verify(KEY) == []


def test_reading_a_column_the_table_lacks_says_so(store):
    store.write_table(KEY, table(4), stage="ingest")
    with pytest.raises(ValueError, match=r"has no column\(s\) \['step'\]; its columns: \['episode', 'x'\]") as e:
        store.read_table(KEY, columns=["episode", "step"])
    assert not isinstance(e.value, DamagedTableError)  # nothing to rebuild
    with pytest.raises(ValueError, match=r"no column\(s\) \['step'\]"):
        next(store.iter_batches(KEY, columns=["step"]))
