"""Property-based tests of the robomimic / LIBERO HDF5 reader: random damage (a value made NaN or
inf, a dataset of the wrong width, length or type, a key or demo group removed, the file cut or
its header zeroed) ends in a :class:`SourceFormatError` / :class:`StepValidationError` naming the
file (and, for damage inside a demo, the demo), or in a read equal to the undamaged file's; the
table committed before is never touched.

HDF5 keeps no checksum of raw data (robomimic and LIBERO write none), so a flipped byte inside a
dataset's values reads as another finite number: no reader can tell, and such flips are not
drawn here. What the format can show (its structure, the values' shape, type and finiteness) is.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hdf5_factory import LOW_DIM, make_hdf5  # noqa: E402
from ingest_calls import ingest_hdf5  # noqa: E402

from distcur.data import steps_key  # noqa: E402
from distcur.schema import StepValidationError  # noqa: E402
from distcur.sources.common import SourceFormatError  # noqa: E402
from distcur.store import Store  # noqa: E402

h5py = pytest.importorskip("h5py")
SOURCE = "libero"
DEMOS = 4
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("hdf5-fuzz")
    fixture = make_hdf5(root / "task_demo.hdf5", num_demos=DEMOS, seed=5, with_camera=False)
    store = Store(root / "store")
    ingest_hdf5([fixture.path], store, SOURCE, progress=False)
    return fixture, store.read_table(steps_key(SOURCE))


KEYS = [f"obs/{k}" for k in sorted(LOW_DIM)] + ["actions"]


@st.composite
def damage(draw):
    """(kind, demo it is in or None, a function of the open h5py file or of the file's bytes)."""
    kind = draw(st.sampled_from(["non-finite", "width", "length", "type", "missing-key", "missing-demo",
                                 "cut", "zero-header"]))
    demo = f"demo_{draw(st.integers(0, DEMOS - 1))}"
    key = draw(st.sampled_from(KEYS))
    if kind == "non-finite":
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        at = draw(st.integers(0, 2)), draw(st.integers(0, 1))

        def apply(f):
            d = f[f"data/{demo}/{key}"][()]
            d[at] = value
            del f[f"data/{demo}/{key}"]
            f[f"data/{demo}/{key}"] = d
        return kind, demo, apply
    if kind in ("width", "length", "type"):
        def apply(f):
            d = f[f"data/{demo}/{key}"][()]
            new = {"width": lambda: np.concatenate([d, d[:, :1]], axis=1),
                   "length": lambda: d[:-1], "type": lambda: np.array([b"x"] * len(d))}[kind]()
            del f[f"data/{demo}/{key}"]
            f[f"data/{demo}/{key}"] = new
        return kind, demo, apply
    if kind == "missing-key":
        def apply(f):
            del f[f"data/{demo}/{key}"]
        return kind, demo, apply
    if kind == "missing-demo":  # a demo gone but still listed in a mask: not an error, one demo less
        def apply(f):
            del f[f"data/{demo}"]
        return kind, None, apply
    fraction = draw(st.floats(0.0, 0.95))
    start, length = draw(st.integers(0, 1536)), draw(st.integers(1, 512))
    if kind == "cut":
        return kind, None, lambda b: b[: int(len(b) * fraction)]
    return kind, None, lambda b: b[:start] + bytes(len(b[start:start + length])) + b[start + length:]


@FUZZ
@given(case=damage())
def test_damaged_hdf5_is_named_or_read_correctly(original, tmp_path_factory, case):
    fixture, expected = original
    kind, demo, apply = case
    work = tmp_path_factory.mktemp("case")
    path = str(work / "task_demo.hdf5")
    shutil.copy(fixture.path, path)
    if kind in ("cut", "zero-header"):
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(apply(data))
    else:
        with h5py.File(path, "a") as f:
            apply(f)
    store = Store(work / "store")
    good = store.write_table(steps_key(SOURCE), expected, stage="ingest-hdf5")
    try:
        ingest_hdf5([path], store, SOURCE, progress=False, force=True)
    except (SourceFormatError, StepValidationError) as e:
        assert "task_demo.hdf5" in str(e), f"{kind}: the error does not name the file: {e}"
        if demo is not None:
            assert demo in str(e), f"{kind} in {demo}: the error does not name the demo: {e}"
        assert store.manifest(steps_key(SOURCE)).to_json() == good.to_json(), f"{kind}: the committed table changed"
        event(f"{kind}: clear error")
        return
    got = store.read_table(steps_key(SOURCE))
    if kind == "missing-demo":  # the other demos, exactly
        assert got.num_rows < expected.num_rows
        event(f"{kind}: read the remaining demos")
        return
    assert got.equals(expected), f"{kind}: read {got.num_rows} rows without an error, not the file's data"
    event(f"{kind}: read correctly")
