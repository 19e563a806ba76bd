"""robomimic / LIBERO HDF5 ingest: files written with h5py in the published layout, read back
in-process and through Ray Data with the same result; bad input names file, demo and key."""

from __future__ import annotations

import io
import os
import sys

import h5py
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hdf5_factory import CAMERA, LOW_DIM, make_hdf5  # noqa: E402
from ingest_calls import ingest_hdf5  # noqa: E402

from distcur.cli import main as cli_main  # noqa: E402
from distcur.data import steps_key  # noqa: E402
from distcur.distributed.ingest import ray_mapper  # noqa: E402
from distcur.schema import StepValidationError  # noqa: E402
from distcur.sources.common import SourceFormatError  # noqa: E402
from distcur.sources.hdf5 import HDF5Config, demo_number, task_from_file_name  # noqa: E402
from distcur.store import Store  # noqa: E402

SOURCE = "libero"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hdf5")
    a = make_hdf5(root / "KITCHEN_SCENE1_put_the_bowl_on_the_plate_demo.hdf5", num_demos=12, seed=1)
    b = make_hdf5(root / "LIVING_ROOM_SCENE2_pick_up_the_book_demo.hdf5", num_demos=3, seed=2, instruction=None)
    return a, b


def test_in_process_and_ray_give_the_same_table_with_every_value(ray_session, files, tmp_path):
    a, b = files
    config = HDF5Config(image_keys=(CAMERA,))
    store = Store(tmp_path / "store")
    r1 = ingest_hdf5([a.path, b.path], store, SOURCE, config, progress=False)
    t1 = store.read_table(steps_key(SOURCE))
    r2 = ingest_hdf5([a.path, b.path], store, SOURCE, config, executor=ray_mapper(progress=False), force=True,
                     demos_per_shard=5, progress=False)
    t2 = store.read_table(steps_key(SOURCE))
    assert len(r2.shard_results) == 4  # 12 demos in groups of 5 (3 shards) + 1 file of 3 demos
    assert t1.equals(t2)
    # episode ids by demo number across files in the order given: demo_10 after demo_9
    demos = a.demos + b.demos
    meta = r1.manifest.metadata[SOURCE]
    assert [meta["episode_info"][str(i)]["demo"] for i in range(15)] == [d.name for d in demos]
    assert meta["episode_info"]["10"] == {"file": a.path, "demo": "demo_10", "steps": a.demos[10].steps,
                                          "groups": ["20_percent", "valid"]}
    assert meta["episode_info"]["0"]["groups"] == ["20_percent", "train"]
    assert meta["episode_info"]["12"]["file"] == b.path
    assert (meta["state_dim"], meta["action_dim"], meta["episodes"]) == (sum(LOW_DIM.values()), 7, 15)
    assert meta["control_frequency"] == 20.0 and meta["camera_names"] == [CAMERA]
    assert meta["obs_keys"] == sorted(LOW_DIM)
    actions = np.concatenate([d.actions for d in demos]).astype(np.float32)
    np.testing.assert_allclose(meta["action_mean"], actions.mean(0), atol=1e-5)
    np.testing.assert_allclose(meta["action_std"], actions.std(0), atol=1e-5)
    from PIL import Image

    for eid, d in enumerate(demos):
        rows = t1.filter(t1.column("episode").to_numpy() == eid).to_pydict()
        assert rows["step"] == list(range(d.steps))
        np.testing.assert_array_equal(np.array(rows["state"], np.float32), d.state())
        np.testing.assert_array_equal(np.array(rows["action"], np.float32), d.actions.astype(np.float32))
        np.testing.assert_array_equal(np.array(rows["reward"], np.float32), d.rewards.astype(np.float32))
        assert rows["is_terminal"] == [bool(x) for x in d.dones]
        assert rows["is_last"] == [t == d.steps - 1 for t in range(d.steps)]
        frame = np.asarray(Image.open(io.BytesIO(rows["image"][0])))
        np.testing.assert_array_equal(frame, d.obs[CAMERA][0])  # PNG: lossless
        expected_task = "put the bowl on the plate" if eid < 12 else "pick up the book"
        assert rows["task"] == [expected_task] * d.steps
    again = ingest_hdf5([a.path, b.path], store, SOURCE, config, progress=False, demos_per_shard=5)
    assert not again.skipped or again.manifest.files == r2.manifest.files


def test_filter_key_obs_keys_and_resume(files, tmp_path):
    a, _ = files
    store = Store(tmp_path / "store")
    config = HDF5Config(obs_keys=("object", "robot0_eef_pos"), filter_key="valid")
    r = ingest_hdf5([a.path], store, SOURCE, config, progress=False)
    meta = r.manifest.metadata[SOURCE]
    assert [v["demo"] for v in meta["episode_info"].values()] == a.masks["valid"]
    table = store.read_table(steps_key(SOURCE))
    d = a.demos[9]
    rows = table.filter(table.column("episode").to_numpy() == 0).to_pydict()
    np.testing.assert_array_equal(np.array(rows["state"], np.float32), d.state(["object", "robot0_eef_pos"]))
    assert rows["image"] == [None] * d.steps and meta["state_dim"] == 7
    assert ingest_hdf5([a.path], store, SOURCE, config, progress=False).skipped


def test_demo_number_order_and_task_from_file_name():
    assert sorted(["demo_10", "demo_9", "demo_1"], key=demo_number) == ["demo_1", "demo_9", "demo_10"]
    assert task_from_file_name("/x/KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5") == "turn on the stove"


def _corrupt(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize("case, expected", [
    ("missing_actions", r"demo 'demo_3' \(episode 3\): missing key 'actions'"),
    ("nan", r"demo 'demo_2' \(episode 2\).*non-finite value nan.*column='state'"),
    ("wrong_dim", r"demo 'demo_4' \(episode 4\).*inconsistent action dim"),
    ("short_obs", r"demo 'demo_1' \(episode 1\), obs: key 'object' has 2 steps but \d+ actions"),
    ("empty", r"empty file: 'data' holds no demos"),
    ("no_data", r"no 'data' group"),
])
def test_bad_input_names_file_demo_and_key_and_keeps_the_committed_table(files, tmp_path, case, expected):
    a, _ = files
    store = Store(tmp_path / "store")
    good = ingest_hdf5([a.path], store, SOURCE, progress=False).manifest
    path = tmp_path / "bad.hdf5"
    make_hdf5(path, num_demos=6, seed=3, with_camera=False)
    if case == "missing_actions":
        _corrupt(path, lambda f: f["data/demo_3"].pop("actions"))
    elif case == "nan":
        def nan(f):
            f["data/demo_2/obs/object"][1, 0] = np.nan
        _corrupt(path, nan)
    elif case == "wrong_dim":
        def wrong(f):
            t = f["data/demo_4/actions"].shape[0]
            del f["data/demo_4/actions"]
            f["data/demo_4"].create_dataset("actions", data=np.zeros((t, 6)))
        _corrupt(path, wrong)
    elif case == "short_obs":
        def short(f):
            del f["data/demo_1/obs/object"]
            f["data/demo_1/obs"].create_dataset("object", data=np.zeros((2, 4)))
        _corrupt(path, short)
    elif case == "empty":
        with h5py.File(path, "w") as f:
            f.create_group("data")
    elif case == "no_data":
        with h5py.File(path, "w") as f:
            f.create_group("something")
    with pytest.raises((SourceFormatError, StepValidationError), match=expected) as e:
        ingest_hdf5([str(path)], store, SOURCE, force=True, progress=False)
    assert str(path) in str(e.value)
    assert store.manifest(steps_key(SOURCE)).files == good.files  # nothing committed lost
    assert store.read_table(steps_key(SOURCE)).num_rows == good.rows


def test_unknown_filter_key_and_camera_as_state(files, tmp_path):
    a, _ = files
    store = Store(tmp_path / "store")
    with pytest.raises(SourceFormatError, match=r"no filter key mask/'nope'; the file has masks \['20_percent'"):
        ingest_hdf5([a.path], store, SOURCE, HDF5Config(filter_key="nope"), progress=False)
    with pytest.raises(SourceFormatError, match="are camera images"):
        ingest_hdf5([a.path], store, SOURCE, HDF5Config(obs_keys=(CAMERA,)), progress=False)


def test_cli_ingest_hdf5(files, tmp_path, capsys):
    a, b = files
    out = tmp_path / "store"
    assert cli_main(["ingest", "hdf5", a.path, b.path, "--source", SOURCE, "--out", str(out), "--no-ray",
                     "--obs-keys", "robot0_eef_pos", "--image-keys", CAMERA, "--filter-key", "train",
                     "--control-frequency", "10"]) == 0
    m = Store(out).manifest(steps_key(SOURCE))
    assert m.metadata[SOURCE]["state_dim"] == 3 and m.metadata[SOURCE]["control_frequency"] == 10.0
    assert m.metadata[SOURCE]["episodes"] == len(a.masks["train"]) + len(b.masks["train"])
    capsys.readouterr()
    assert cli_main(["ingest", "hdf5", str(tmp_path / "missing.hdf5"), "--source", "x", "--out", str(out),
                     "--no-ray"]) == 2
    assert "missing.hdf5: no such file" in capsys.readouterr().err
