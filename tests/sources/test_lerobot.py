"""LeRobot v3 ingest: a dataset written per the v3 layout, read through Ray Data (one task per data
file) and in process with the same table; ``ray.data.read_lerobot`` when lerobot is installed."""

from __future__ import annotations

import inspect
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ingest_calls import ingest_lerobot  # noqa: E402
from lerobot_factory import TASKS, make_lerobot  # noqa: E402

from distcur.cli import main as cli_main  # noqa: E402
from distcur.data import steps_key  # noqa: E402
from distcur.distributed.ingest import ray_mapper  # noqa: E402
from distcur.sources.common import SourceFormatError  # noqa: E402
from distcur.sources.lerobot import lerobot_reader_available  # noqa: E402
from distcur.store import Store  # noqa: E402

SOURCE = "so100"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lerobot(tmp_path_factory.mktemp("lerobot") / "ds", first_index=1000)


def check_table(table, fx):
    frames = fx.frames.to_pydict()
    assert table.num_rows == len(frames["index"])
    for e, n in enumerate(fx.lengths):
        rows = table.filter(table.column("episode").to_numpy() == e).to_pydict()
        src = [i for i, x in enumerate(frames["episode_index"]) if x == e]
        assert rows["step"] == [frames["frame_index"][i] for i in src] == list(range(n))
        np.testing.assert_array_equal(np.array(rows["state"], np.float32),
                                      np.array([frames["observation.state"][i] for i in src], np.float32))
        np.testing.assert_array_equal(np.array(rows["action"], np.float32),
                                      np.array([frames["action"][i] for i in src], np.float32))
        assert rows["task"] == [TASKS[e % 2]] * n


def test_ray_data_and_in_process_give_the_same_table(ray_session, dataset, tmp_path):
    store = Store(tmp_path / "store")
    r = ingest_lerobot(dataset.root, store, SOURCE, executor=ray_mapper(progress=False), progress=False)
    t1 = store.read_table(steps_key(SOURCE))
    check_table(t1, dataset)
    assert len(r.shard_results) == 2  # one task per data file
    ingest_lerobot(dataset.root, store, SOURCE, force=True, progress=False)
    assert store.read_table(steps_key(SOURCE)).equals(t1)
    meta = r.manifest.metadata[SOURCE]
    assert meta["format"] == "lerobot" and meta["control_frequency"] == 10
    assert meta["episode_info"]["1"] == {"episode_index": 1, "from_index": 1004, "length": 6,
                                         "file": "data/chunk-000/file-000.parquet"}
    assert (meta["state_dim"], meta["action_dim"], meta["episodes"]) == (6, 4, 5)
    assert ingest_lerobot(dataset.root, store, SOURCE, progress=False).skipped


@pytest.mark.skipif(not lerobot_reader_available(), reason="ray.data.read_lerobot needs lerobot>=0.5 (Python>=3.12)")
def test_ray_read_lerobot_gives_the_same_table(ray_session, dataset, tmp_path):
    store = Store(tmp_path / "store")
    ingest_lerobot(dataset.root, store, SOURCE, reader="files", progress=False)
    t1 = store.read_table(steps_key(SOURCE))
    ingest_lerobot(dataset.root, store, SOURCE, executor=ray_mapper(progress=False), reader="ray-lerobot", force=True,
                   progress=False)
    assert store.read_table(steps_key(SOURCE)).equals(t1)


def test_read_lerobot_signature_is_what_the_reader_calls():
    import ray.data

    params = inspect.signature(ray.data.read_lerobot).parameters
    assert list(params)[0] == "root" and {"episodes", "read_granularity", "filesystem"} <= set(params)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_bad_input_names_file_episode_and_column(dataset, tmp_path):
    store = Store(tmp_path / "store")
    good = ingest_lerobot(dataset.root, store, SOURCE, progress=False).manifest

    bad = _copy(dataset.root, tmp_path / "bad_index")
    f = f"{bad}/data/chunk-000/file-001.parquet"
    t = pq.read_table(f)
    idx = t.column("index").to_pylist()
    idx[1] += 7
    pq.write_table(t.set_column(t.schema.get_field_index("index"), "index", [idx]), f)
    with pytest.raises(SourceFormatError, match=r"file-001.parquet, episode_index 3: column 'index' is 1021 at "
                                                r"frame_index 1; expected dataset_from_index 1013"):
        ingest_lerobot(bad, store, SOURCE, force=True, progress=False)

    bad = _copy(dataset.root, tmp_path / "bad_state")
    f = f"{bad}/data/chunk-000/file-000.parquet"
    t = pq.read_table(f)
    state = t.column("observation.state").to_pylist()
    state[2][0] = float("nan")
    import pyarrow as pa

    t = t.set_column(0, "observation.state", pa.array(state, pa.list_(pa.float32(), 6)))
    pq.write_table(t, f)
    with pytest.raises(ValueError, match=r"file-000.parquet, episode_index 0: non-finite value nan .*column='state'"):
        ingest_lerobot(bad, store, SOURCE, force=True, progress=False)

    bad = _copy(dataset.root, tmp_path / "no_feature")
    info = json.load(open(f"{bad}/meta/info.json"))
    with pytest.raises(SourceFormatError, match=r"no feature 'observation.joints' for state"):
        from distcur.sources.lerobot import LeRobotConfig

        ingest_lerobot(bad, store, SOURCE, LeRobotConfig(state_key="observation.joints"), force=True, progress=False)
    info["codebase_version"] = "v2.1"
    json.dump(info, open(f"{bad}/meta/info.json", "w"))
    with pytest.raises(SourceFormatError, match=r"codebase_version 'v2.1'; expected a LeRobot v3 dataset"):
        ingest_lerobot(bad, store, SOURCE, force=True, progress=False)
    os.remove(f"{bad}/meta/info.json")
    with pytest.raises(SourceFormatError, match=r"missing meta/info.json"):
        ingest_lerobot(bad, store, SOURCE, force=True, progress=False)

    assert store.manifest(steps_key(SOURCE)).files == good.files


def test_cli_ingest_lerobot(dataset, tmp_path):
    out = tmp_path / "store"
    assert cli_main(["ingest", "lerobot", dataset.root, "--source", SOURCE, "--out", str(out), "--no-ray"]) == 0
    assert Store(out).manifest(steps_key(SOURCE)).metadata[SOURCE]["episodes"] == 5
