"""Exports back to the sources' own formats: a LeRobot dataset's own `index` (dense or sparse, with
episode_index / frame_index and alpha) and robomimic `mask/<key>` in a copy of the HDF5 file."""

from __future__ import annotations

import os
import sys

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hdf5_factory import make_hdf5  # noqa: E402
from ingest_calls import ingest_hdf5, ingest_lerobot  # noqa: E402
from lerobot_factory import make_lerobot  # noqa: E402

from distcur.cli import main as cli_main  # noqa: E402
from distcur.data import scores_key, steps_key  # noqa: E402
from distcur.schema import SCORE_SCHEMA  # noqa: E402
from distcur.select import SelectConfig  # noqa: E402
from distcur.stages.select import hdf5_mask_dir, lerobot_key  # noqa: E402
from distcur.stages.select import select as run_select  # noqa: E402
from distcur.store import Store  # noqa: E402


def write_scores(store: Store, source: str, run: str = "sc", seed: int = 0) -> None:
    steps = store.read_table(steps_key(source), columns=["source", "episode", "step"])
    rng = np.random.default_rng(seed)
    n = steps.num_rows
    table = pa.Table.from_arrays([steps.column("source"), steps.column("episode"), steps.column("step"),
                                  pa.array(rng.random(n)), pa.array(["rand"] * n)], schema=SCORE_SCHEMA)
    store.write_table(scores_key(run), table, "score", {"method": "rand"}, metadata={"method": "rand"})


def test_lerobot_export_uses_the_datasets_own_index(tmp_path):
    fx = make_lerobot(tmp_path / "ds", first_index=1000)  # the dataset's index is not distcur's running count
    store = Store(tmp_path / "store")
    ingest_lerobot(fx.root, store, "so100", progress=False)
    write_scores(store, "so100")
    run_select(store, "sc", "sel", SelectConfig(budget_percent=30), export_lerobot=True, alpha=0.25)
    sel = store.read_table("selections/sel")
    exp = store.read_table(lerobot_key("sel"))
    assert exp.column_names == ["source", "index", "episode_index", "frame_index", "weight"]
    # dense: every frame of the dataset, each with the dataset's own index
    data = pa.concat_tables([pq.read_table(f"{fx.root}/data/chunk-000/file-00{i}.parquet") for i in (0, 1)])
    own = {(e, f): i for e, f, i in zip(data.column("episode_index").to_pylist(), data.column("frame_index").to_pylist(),
                                        data.column("index").to_pylist())}
    assert exp.num_rows == data.num_rows
    got = {(e, f): i for e, f, i in zip(exp.column("episode_index").to_pylist(), exp.column("frame_index").to_pylist(),
                                        exp.column("index").to_pylist())}
    assert got == own
    assert sorted(exp.column("index").to_pylist()) == sorted(data.column("index").to_pylist())
    chosen = {(e, s) for e, s in zip(sel.column("episode").to_pylist(), sel.column("step").to_pylist())}
    weights = dict(zip(zip(exp.column("episode_index").to_pylist(), exp.column("frame_index").to_pylist()),
                       exp.column("weight").to_pylist()))
    assert {k for k, w in weights.items() if w > 0} == chosen
    m = store.manifest(lerobot_key("sel"))
    assert m.metadata["dense"] is True and m.metadata["alpha"] == 0.25 and m.metadata["fallback_weight"] == 0.0
    assert m.metadata["datasets"] == {"so100": fx.root}

    # sparse: only the selected frames; the manifest states the weight of the others
    run_select(store, "sc", "sel-sparse", SelectConfig(budget_percent=30), export_lerobot=True, dense=False)
    sparse = store.read_table(lerobot_key("sel-sparse"))
    assert sparse.num_rows == sel.num_rows
    assert all(own[(e, f)] == i for e, f, i in zip(sparse.column("episode_index").to_pylist(),
                                                    sparse.column("frame_index").to_pylist(),
                                                    sparse.column("index").to_pylist()))
    ms = store.manifest(lerobot_key("sel-sparse"))
    assert ms.metadata["dense"] is False and ms.metadata["fallback_weight"] == 0.0 and ms.metadata["alpha"] == 0.5


def test_hdf5_mask_export_writes_a_copy_never_the_original(tmp_path, capsys):
    fx = make_hdf5(tmp_path / "lift.hdf5", num_demos=10, seed=4, with_camera=False)
    with open(fx.path, "rb") as f:
        original = f.read()
    store = Store(tmp_path / "store")
    ingest_hdf5([fx.path], store, "lift", progress=False)
    write_scores(store, "lift")
    assert cli_main(["select", "--store", str(store.uri), "--scores", "sc", "--run", "sel", "--level", "episode",
                     "--top", "30", "--export-hdf5-mask", "curated"]) == 0
    sel = store.read_table("selections/sel")
    info = store.manifest(steps_key("lift")).metadata["lift"]["episode_info"]
    expected = sorted({info[str(e)]["demo"] for e in sel.column("episode").to_pylist()},
                      key=lambda n: int(n.split("_")[1]))
    copy = store.path(f"{hdf5_mask_dir('sel')}/lift/lift.hdf5")
    with h5py.File(copy, "r") as f:
        assert [n.decode() for n in f["mask/curated"][()]] == expected == sorted(expected, key=lambda n: int(n[5:]))
        assert sorted(f["mask"].keys()) == ["20_percent", "curated", "train", "valid"]
        np.testing.assert_array_equal(f["data/demo_3/actions"][()], fx.demos[3].actions)
    with open(fx.path, "rb") as f:
        assert f.read() == original  # the original is untouched
    with h5py.File(fx.path, "r") as f:
        assert "curated" not in f["mask"]


def test_hdf5_mask_export_needs_an_hdf5_source(tmp_path):
    fx = make_lerobot(tmp_path / "ds")
    store = Store(tmp_path / "store")
    ingest_lerobot(fx.root, store, "so100", progress=False)
    write_scores(store, "so100")
    with pytest.raises(ValueError, match="no source of selection selections/sel was ingested from HDF5"):
        run_select(store, "sc", "sel", SelectConfig(), export_hdf5_mask="curated")
