"""The Store API on a local folder and on S3 (moto's server on loopback): same behaviour on both."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pytest

from distcur import __version__
from distcur.store import LAYOUT_VERSION, MANIFEST, Store, fingerprint, resolve

KEY = "steps/source=demo"


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
