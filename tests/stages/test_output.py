"""The stage output protocol: skip when current, else write and commit, abort on any error."""

from __future__ import annotations

import pyarrow as pa
import pytest

from distcur.stages.output import commit_files, commit_output, commit_table
from distcur.store import Store


def _table(n: int) -> pa.Table:
    return pa.table({"x": list(range(n))})


def test_skips_a_current_output_and_rebuilds_when_config_or_inputs_change(tmp_path):
    store = Store(tmp_path)
    calls = []

    def make():
        calls.append(1)
        return _table(3), {"n": 3}

    first = commit_table(store, "t", "demo", {"a": 1}, {"in": "f1"}, make)
    again = commit_table(store, "t", "demo", {"a": 1}, {"in": "f1"}, make)
    assert not first.skipped and again.skipped and len(calls) == 1
    assert again.manifest.fingerprint == first.manifest.fingerprint and again.manifest.metadata == {"n": 3}
    assert commit_table(store, "t", "demo", {"a": 2}, {"in": "f1"}, make).skipped is False
    assert commit_table(store, "t", "demo", {"a": 2}, {"in": "f2"}, make).skipped is False
    assert commit_table(store, "t", "demo", {"a": 2}, {"in": "f2"}, make, force=True).skipped is False
    assert len(calls) == 4 and store.read_table("t").num_rows == 3


def test_an_error_while_producing_aborts_and_keeps_the_committed_version(tmp_path):
    store = Store(tmp_path)
    commit_table(store, "t", "demo", {"a": 1}, {}, lambda: (_table(2), None))
    before = set(store.listdir("t"))

    def produce(writer):
        writer.write(_table(5))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        commit_output(store, "t", "demo", {"a": 2}, {}, produce)
    assert set(store.listdir("t")) == before  # the aborted version's parts are gone
    assert store.read_table("t").num_rows == 2 and store.manifest("t").config == {"a": 1}


def test_produce_may_adopt_parts_written_under_the_writer_dir(tmp_path):
    store = Store(tmp_path)

    def produce(writer):
        rel = f"{writer.data_dir}/worker-0.parquet"
        store.write_parquet(rel, _table(4))
        writer.add_files([rel], rows=4, schema=_table(0).schema)
        return {"workers": 1}

    out = commit_output(store, "t", "demo", {}, {}, produce)
    assert out.manifest.rows == 4 and store.read_table("t").num_rows == 4 and store.is_done("t", "demo", {}, {})


def test_files_at_fixed_paths_are_done_only_once_their_manifest_is_written(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"policies/p: cannot commit \['policies/p/policy.pt'\]"):
        commit_files(store, "policies/p", "train", {"lr": 1}, {"in": "f1"}, ["policies/p/policy.pt"], 5)
    assert store.manifest("policies/p") is None and not store.is_done("policies/p", "train", {"lr": 1}, {"in": "f1"})
    store.write_bytes("policies/p/policy.pt", b"weights")
    m = commit_files(store, "policies/p", "train", {"lr": 1}, {"in": "f1"}, ["policies/p/policy.pt"], 5,
                     {"history": [1.0]}, wall_s=2.5)
    assert store.manifest("policies/p") == m and m.rows == 5 and m.metadata == {"history": [1.0]}
    assert store.is_done("policies/p", "train", {"lr": 1}, {"in": "f1"})
    assert not store.is_done("policies/p", "train", {"lr": 2}, {"in": "f1"})
