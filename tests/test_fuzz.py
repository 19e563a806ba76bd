"""Property-based tests of the readers: random corruptions of step tables, of committed Parquet parts
and of manifests end in a clear error (StepValidationError / DamagedTableError naming the file) or
a correct read, never another exception type and never a silently different table."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distcur.data import steps_key
from distcur.schema import StepValidationError, steps_table, validate_steps
from distcur.store import MANIFEST, DamagedTableError, Store

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
EPISODES, LENGTH = 2, 6
KEY = steps_key("prior")


def base_table() -> pa.Table:
    rng = np.random.default_rng(0)
    step = np.tile(np.arange(LENGTH), EPISODES)
    n = len(step)
    return steps_table({"source": "prior", "episode": np.repeat(np.arange(EPISODES), LENGTH), "step": step,
                        "state": rng.normal(size=(n, 3)), "action": rng.normal(size=(n, 2)),
                        "is_first": step == 0, "is_last": step == LENGTH - 1, "is_terminal": step == LENGTH - 1})


BASE = base_table()
ROWS = BASE.num_rows


def _with_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _vectors(table: pa.Table, name: str) -> list[list[float]]:
    return table.column(name).to_pylist()


@st.composite
def corrupted_steps(draw) -> tuple[pa.Table, str]:
    """(a corrupted copy of BASE, what the error must mention)."""
    kind = draw(st.sampled_from(["non-finite", "wrong-dim", "empty", "wrong-type", "missing", "order"]))
    row = draw(st.integers(0, ROWS - 1))
    column = draw(st.sampled_from(["state", "action"]))
    if kind == "non-finite":
        vectors = _vectors(BASE, column)
        vectors[row][draw(st.integers(0, len(vectors[row]) - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return _with_column(BASE, column, pa.array(vectors, pa.list_(pa.float32()))), \
            f"episode={row // LENGTH}, step={row % LENGTH}, column={column!r}"
    if kind == "wrong-dim":
        vectors = _vectors(BASE, column)
        vectors[row] = vectors[row][:-1] if draw(st.booleans()) else vectors[row] + [0.0]
        return _with_column(BASE, column, pa.array(vectors, pa.list_(pa.float32()))), f"inconsistent {column} dim"
    if kind == "empty":
        return BASE.slice(0, 0), "step table is empty"
    if kind == "wrong-type":
        name = draw(st.sampled_from(["episode", "step", "state", "action", "is_first"]))
        junk = draw(st.sampled_from([pa.array(["x"] * ROWS), pa.array([1.5] * ROWS),
                                     pa.array([{"a": 1}] * ROWS), pa.array([[["deep"]]] * ROWS)]))
        return _with_column(BASE, name, junk), ""
    if kind == "missing":
        name = draw(st.sampled_from(["episode", "step", "state", "action", "is_last"]))
        return BASE.drop_columns([name]), f"missing columns ['{name}']"
    steps = BASE.column("step").to_numpy().copy()
    steps[row] = steps[row] + draw(st.integers(1, 3))
    return _with_column(BASE, "step", pa.array(steps, pa.int32())), ""


@FUZZ
@given(corrupted_steps())
def test_corrupted_step_tables_fail_with_a_clear_error(case):
    table, mention = case
    with pytest.raises(StepValidationError) as e:
        validate_steps(table, origin="fuzz.parquet")
    assert str(e.value).startswith("fuzz.parquet: ") and mention in str(e.value)


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "store")
    s.write_table(KEY, BASE, "ingest", {"fuzz": True}, rows_per_part=5)
    return s


def _read_or_named_damage(store: Store, names: list[str]) -> pa.Table | None:
    """The table as read, or None after a DamagedTableError naming one of ``names`` and the fix."""
    try:
        return store.read_table(KEY)
    except DamagedTableError as e:
        assert any(n in str(e) for n in names) and "--force" in str(e), str(e)
        return None


def _is_base(table: pa.Table) -> bool:
    return table.schema.names == BASE.schema.names and table.equals(BASE.cast(table.schema))


@FUZZ
@given(part=st.integers(0, 2), data=st.data())
def test_damaged_parquet_parts_are_named_or_read_correctly(store, part, data):
    rel = store.manifest(KEY).files[part]
    good = store.read_bytes(rel)
    truncate = data.draw(st.booleans(), label="truncate")
    if truncate:
        bad = good[:data.draw(st.integers(0, len(good) - 1), label="length")]
    else:
        at = data.draw(st.integers(0, len(good) - 1), label="offset")
        bad = good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255), label="xor")]) + good[at + 1:]
    store.write_bytes(rel, bad)
    try:
        table = _read_or_named_damage(store, [store.uri_of(rel)])
        # A plain read checks sizes and page checksums: a truncation is always found. A same-size flip
        # in a footer can leave a readable file (e.g. a renamed column), which verify, reading every
        # byte against the manifest's sha256, finds and names (as `--verify` on a stage does).
        assert table is None or (not truncate and table.num_rows == ROWS)
        problems = store.verify(KEY)
        assert problems and all(store.uri_of(rel) in p for p in problems), problems
    finally:
        store.write_bytes(rel, good)


JSON_JUNK = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False)
                         | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@FUZZ
@given(data=st.data())
def test_damaged_manifests_are_named_or_read_correctly(store, data):
    rel = f"{KEY}/{MANIFEST}"
    good = store.read_text(rel)
    kind = data.draw(st.sampled_from(["truncate", "flip", "wrong-type"]), label="kind")
    if kind == "truncate":
        bad = good[:data.draw(st.integers(0, len(good) - 1), label="length")]
    elif kind == "flip":
        at = data.draw(st.integers(0, len(good) - 1), label="offset")
        bad = good[:at] + chr(ord(good[at]) ^ data.draw(st.integers(1, 127), label="xor")) + good[at + 1:]
    else:
        d = json.loads(good)
        field = data.draw(st.sampled_from(sorted(d)), label="field")
        path = [field]
        if isinstance(d[field], list | dict) and d[field] and data.draw(st.booleans(), label="inside"):
            path.append(data.draw(st.sampled_from(sorted(d[field]) if isinstance(d[field], dict)
                                                  else list(range(len(d[field])))), label="item"))
        target = d
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = data.draw(JSON_JUNK, label="value")
        bad = json.dumps(d)
    store.write_text(rel, bad)
    try:
        names = [store.uri_of(rel), *(store.uri_of(f) for f in json.loads(good)["files"])]
        try:
            store.manifest(KEY)
        except DamagedTableError as e:
            assert store.uri_of(rel) in str(e), str(e)
        table = _read_or_named_damage(store, [*names, store.uri_of(KEY)])
        assert table is None or _is_base(table)  # the parts are intact: read right or not at all
        assert all(isinstance(p, str) for p in store.verify(KEY))
    finally:
        store.write_text(rel, good)
