"""RLDS/OXE ingest: TFDS-built datasets on disk, read back without TensorFlow, through Ray Data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.fs as pafs
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ingest_calls import ingest_rlds, ingest_rlds_ray  # noqa: E402
from rlds_factory import make_episode, make_rlds_dataset, rlds_features  # noqa: E402

from distcur.cli import main as cli_main  # noqa: E402
from distcur.data import steps_key  # noqa: E402
from distcur.schema import StepValidationError  # noqa: E402
from distcur.sources.rlds import RLDSDataset, RLDSFormatError, check_config  # noqa: E402
from distcur.sources.rlds_configs import CONFIGS, OXE_DICT_ACTION, RLDSConfig, get_config  # noqa: E402
from distcur.store import Store  # noqa: E402

SOURCE = "factory"
CONFIG = RLDSConfig(
    name="factory_rlds",
    state_keys=("observation/state",),
    action_keys=OXE_DICT_ACTION,
    language_key="language_instruction",
    image_keys=("observation/image", "observation/wrist_image"),
    action_dim=7,
    control_frequency=3.0,
)
CONFIG_LANG_IN_OBS = RLDSConfig(**{**CONFIG.to_dict(), "language_key": "observation/natural_language_instruction"})


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same 6 episodes as TFRecord (3 shards, 1 shard) and array_record (2 shards)."""
    root = tmp_path_factory.mktemp("rlds")
    tf3 = make_rlds_dataset(root / "tf3", file_format="tfrecord", num_shards=3, num_episodes=6, seed=1)
    tf1 = make_rlds_dataset(root / "tf1", file_format="tfrecord", num_shards=1, episodes=tf3.episodes)
    ar2 = make_rlds_dataset(root / "ar2", file_format="array_record", num_shards=2, episodes=tf3.episodes,
                            language_in_observation=True)
    return {"tf3": tf3, "tf1": tf1, "ar2": ar2}


def assert_table_matches(table, episodes) -> None:
    """Every value of the step table equals what the factory wrote."""
    assert table.num_rows == sum(e.steps for e in episodes)
    ep_col = table.column("episode").to_numpy()
    np.testing.assert_array_equal(np.unique(ep_col), np.arange(len(episodes)))
    for i, ep in enumerate(episodes):
        rows = table.filter(table.column("episode").to_numpy() == i).to_pydict()
        assert rows["step"] == list(range(ep.steps))
        assert rows["source"] == [SOURCE] * ep.steps
        assert rows["task"] == [ep.instruction] * ep.steps
        np.testing.assert_array_equal(np.array(rows["state"], np.float32), ep.state)
        np.testing.assert_array_equal(np.array(rows["action"], np.float32), ep.action)
        assert rows["image"] == ep.image  # encoded jpeg bytes, byte for byte
        np.testing.assert_array_equal(np.array(rows["reward"], np.float32), ep.reward)
        assert rows["is_first"] == [t == 0 for t in range(ep.steps)]
        assert rows["is_last"] == [t == ep.steps - 1 for t in range(ep.steps)]
        assert rows["is_terminal"] == ep.is_terminal.tolist()
        assert rows["success"] == [None] * ep.steps


def test_tfrecord_through_ray_data_reproduces_every_value(ray_session, datasets, tmp_path):
    ds = datasets["tf3"]
    store = Store(tmp_path / "store")
    result = ingest_rlds_ray(ds.path, CONFIG, store, source=SOURCE, progress=False)
    assert not result.skipped
    assert len(result.shard_results) == 3  # one read task per shard file
    assert not any(r.tensorflow_loaded for r in result.shard_results), "a worker imported tensorflow"
    table = store.read_table(steps_key(SOURCE))
    assert_table_matches(table, ds.episodes)
    meta = result.manifest.metadata[SOURCE]
    actions = np.concatenate([e.action for e in ds.episodes])
    assert (meta["state_dim"], meta["action_dim"], meta["episodes"], meta["steps"]) == (5, 7, 6, len(actions))
    np.testing.assert_allclose(meta["action_mean"], actions.mean(0), atol=1e-5)
    np.testing.assert_allclose(meta["action_std"], actions.std(0), atol=1e-5)
    assert meta["action_keys"] == list(OXE_DICT_ACTION) and meta["control_frequency"] == 3.0
    # resume: same inputs and config -> skipped, nothing rewritten
    again = ingest_rlds_ray(ds.path, CONFIG, store, source=SOURCE, progress=False)
    assert again.skipped and again.manifest.files == result.manifest.files


def test_array_record_and_one_shard_give_the_same_table(datasets, tmp_path):
    store = Store(tmp_path / "store")
    tables = {}
    for name, config in (("tf3", CONFIG), ("tf1", CONFIG), ("ar2", CONFIG_LANG_IN_OBS)):
        r = ingest_rlds(datasets[name].path, config, store, source=SOURCE, progress=False)
        assert r.manifest.metadata[SOURCE]["shards"] == datasets[name].num_shards
        tables[name] = store.read_table(steps_key(SOURCE))
    assert_table_matches(tables["ar2"], datasets["tf3"].episodes)
    assert tables["tf1"].equals(tables["tf3"])
    assert tables["ar2"].equals(tables["tf3"])


def test_read_path_imports_no_tensorflow(datasets, tmp_path):
    """Run the worker code path in a fresh interpreter where importing tensorflow fails."""
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class BlockTensorFlow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    raise ImportError("tensorflow is blocked in this test")
        sys.meta_path.insert(0, BlockTensorFlow())
        from distcur.sources.rlds_configs import RLDSConfig
        from tests.ingest_calls import ingest_rlds
        from distcur.store import Store
        config = RLDSConfig(**json.loads({json.dumps(CONFIG.to_dict())!r}))
        lang_obs = RLDSConfig(**{{**config.to_dict(), "language_key": "observation/natural_language_instruction"}})
        store = Store({str(tmp_path / "store")!r})
        a = ingest_rlds({datasets["tf3"].path!r}, config, store, source="a", progress=False)
        b = ingest_rlds({datasets["ar2"].path!r}, lang_obs, store, source="b", progress=False)
        assert "tensorflow" not in sys.modules
        print(a.manifest.rows, b.manifest.rows)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    n = datasets["tf3"].num_steps
    assert out.stdout.split() == [str(n), str(n)]


def test_s3_write_read_resume_and_atomic_commit(ray_session, datasets, s3_bucket, tmp_path):
    ds = datasets["tf3"]
    store = Store(f"{s3_bucket}/distcur")
    remote = f"{s3_bucket}/oxe/factory_rlds/1.0.0"
    pafs.copy_files(ds.path, remote[len("s3://"):], source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=store.fs)
    first = ingest_rlds_ray(remote, CONFIG, store, source=SOURCE, progress=False)
    table = store.read_table(steps_key(SOURCE))
    assert_table_matches(table, ds.episodes)
    assert all(f.startswith(f"{steps_key(SOURCE)}/_data-") for f in first.manifest.files)
    assert ingest_rlds_ray(remote, CONFIG, store, source=SOURCE, progress=False).skipped
    # a failing rerun (bad config, forced) leaves the committed table and nothing else
    bad = RLDSConfig(**{**CONFIG.to_dict(), "action_keys": ("action/world_vector",), "action_dim": 3, "state_dim": 6})
    with pytest.raises(RLDSFormatError, match=r"tfrecord-00000-of-00003, record 0 \(episode 0\), column 'state'"):
        ingest_rlds_ray(remote, bad, store, source=SOURCE, force=True, progress=False)
    assert store.manifest(steps_key(SOURCE)).to_json() == first.manifest.to_json()
    assert store.read_table(steps_key(SOURCE)).equals(table)
    versions = [n for n in store.listdir(steps_key(SOURCE)) if n.startswith("_data-")]
    assert len(versions) == 1 and first.manifest.files[0].split("/")[2] == versions[0]


# -- bad inputs: a clear error naming what and where, previous output intact --------------------


@pytest.fixture
def committed(datasets, tmp_path):
    """A store whose source already holds a good committed table."""
    store = Store(tmp_path / "store")
    r = ingest_rlds(datasets["tf3"].path, CONFIG, store, source=SOURCE, progress=False)
    return store, r.manifest


def copy_dataset(ds, dst) -> str:
    shutil.copytree(ds.path, dst)
    return str(dst)


def assert_intact(store: Store, manifest) -> None:
    assert store.manifest(steps_key(SOURCE)).to_json() == manifest.to_json()
    assert store.read_table(steps_key(SOURCE)).num_rows == manifest.rows
    versions = [n for n in store.listdir(steps_key(SOURCE)) if n.startswith("_data-")]
    assert len(versions) == 1, f"partial output left behind: {versions}"


def shard_path(path: str, fmt: str, index: int, count: int) -> str:
    return os.path.join(path, f"factory_rlds-train.{fmt}-{index:05d}-of-{count:05d}")


def test_truncated_tfrecord(datasets, committed, tmp_path):
    store, manifest = committed
    path = copy_dataset(datasets["tf3"], tmp_path / "bad")
    shard = shard_path(path, "tfrecord", 1, 3)
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:-10])
    with pytest.raises(RLDSFormatError, match=r"tfrecord-00001-of-00003: truncated record 1 at byte \d+"):
        ingest_rlds(path, CONFIG, store, source=SOURCE, progress=False, force=True)
    assert_intact(store, manifest)


def test_corrupt_tfrecord_and_array_record(datasets, committed, tmp_path):
    store, manifest = committed
    path = copy_dataset(datasets["tf3"], tmp_path / "bad_tf")
    shard = shard_path(path, "tfrecord", 2, 3)
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(RLDSFormatError, match=r"tfrecord-00002-of-00003: corrupt record \d at byte \d+ \((data|length) checksum mismatch\)"):
        ingest_rlds(path, CONFIG, store, source=SOURCE, progress=False, force=True)
    path = copy_dataset(datasets["ar2"], tmp_path / "bad_ar")
    shard = shard_path(path, "array_record", 0, 2)
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(RLDSFormatError, match=r"array_record-00000-of-00002: (cannot open array_record file|corrupt).*Corrupted"):
        ingest_rlds(path, CONFIG_LANG_IN_OBS, store, source=SOURCE, progress=False, force=True)
    assert_intact(store, manifest)


def test_missing_key_names_key_and_lists_features(datasets, committed):
    store, manifest = committed
    config = RLDSConfig(**{**CONFIG.to_dict(), "state_keys": ("observation/joint_pos",)})
    with pytest.raises(RLDSFormatError, match=r"reads step feature\(s\) \['observation/joint_pos'\].*observation/state"):
        ingest_rlds(datasets["tf3"].path, config, store, source=SOURCE, progress=False, force=True)
    config = RLDSConfig(**{**CONFIG.to_dict(), "action_keys": ("action",)})
    with pytest.raises(RLDSFormatError, match=r"reads step feature 'action', which is a dict of \['action/grip"):
        ingest_rlds(datasets["tf3"].path, config, store, source=SOURCE, progress=False, force=True)
    assert_intact(store, manifest)


def test_nan_in_action_names_file_episode_step_column(ray_session, datasets, committed, tmp_path):
    store, manifest = committed
    episodes = [make_episode(np.random.default_rng(i), i, 4) for i in range(4)]
    episodes[3].world_vector[2, 1] = np.nan
    ds = make_rlds_dataset(tmp_path / "nan", num_shards=2, episodes=episodes)
    with pytest.raises(
        StepValidationError,
        match=r"tfrecord-00001-of-00002 \(episodes 2..3\): non-finite value nan at source='factory', "
              r"episode=3, step=2, column='action'",
    ):
        ingest_rlds_ray(ds.path, CONFIG, store, source=SOURCE, progress=False, force=True)
    assert_intact(store, manifest)


def test_wrong_action_dim(datasets, committed):
    store, manifest = committed
    config = RLDSConfig(**{**CONFIG.to_dict(), "action_dim": 8})
    with pytest.raises(
        RLDSFormatError,
        match=r"tfrecord-00000-of-00003, record 0 \(episode 0\), column 'action': dim 7 from "
              r"\{'action/world_vector': 3, 'action/rotation_delta': 3, 'action/gripper_closedness_action': 1\}, "
              r"but config 'factory_rlds' expects 8",
    ):
        ingest_rlds(datasets["tf3"].path, config, store, source=SOURCE, progress=False, force=True)
    assert_intact(store, manifest)


def test_empty_dataset(datasets, committed, tmp_path):
    store, manifest = committed
    path = copy_dataset(datasets["tf1"], tmp_path / "empty")
    info = json.load(open(os.path.join(path, "dataset_info.json")))
    info["splits"][0]["shardLengths"] = []
    json.dump(info, open(os.path.join(path, "dataset_info.json"), "w"))
    with pytest.raises(RLDSFormatError, match=r"empty: dataset is empty \(no shard files in splits \['train'\]\)"):
        ingest_rlds(path, CONFIG, store, source=SOURCE, progress=False, force=True)
    with pytest.raises(RLDSFormatError, match=r"no split 'test'; the dataset has splits \['train'\]"):
        ingest_rlds(datasets["tf1"].path, CONFIG, store, source=SOURCE, splits=["test"], progress=False)
    with pytest.raises(RLDSFormatError, match=r"nowhere/dataset_info.json does not exist"):
        ingest_rlds(str(tmp_path / "nowhere"), CONFIG, store, source=SOURCE, progress=False)
    assert_intact(store, manifest)


def test_shard_length_mismatch_is_reported(datasets, committed, tmp_path):
    store, manifest = committed
    path = copy_dataset(datasets["tf3"], tmp_path / "short")
    info = json.load(open(os.path.join(path, "dataset_info.json")))
    info["splits"][0]["shardLengths"] = ["2", "3", "2"]
    json.dump(info, open(os.path.join(path, "dataset_info.json"), "w"))
    with pytest.raises(RLDSFormatError, match=r"tfrecord-00001-of-00003: holds 2 records but dataset_info.json lists 3"):
        ingest_rlds(path, CONFIG, store, source=SOURCE, progress=False, force=True)
    assert_intact(store, manifest)


def test_unknown_dataset_config_lists_known_ones(capsys):
    with pytest.raises(ValueError, match=r"unknown RLDS dataset config 'nope'; known: \['bridge', 'bridge_dataset', "
                                         r"'fractal20220817_data', 'language_table'\]"):
        get_config("nope")
    assert cli_main(["ingest", "rlds", "/nonexistent", "--dataset", "nope", "--no-ray"]) == 2
    assert "known: ['bridge'" in capsys.readouterr().err


# -- configs and CLI --------------------------------------------------------------------------


def published_spec(name: str):
    """Step features of the shipped datasets as published (subset that the configs read)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    img = f.Image(shape=(8, 8, 3), encoding_format="jpeg")
    vec = lambda n: f.Tensor(shape=(n,), dtype=np.float32)  # noqa: E731
    common = {"reward": f.Scalar(dtype=np.float32), "is_first": f.Scalar(dtype=np.bool_),
              "is_last": f.Scalar(dtype=np.bool_), "is_terminal": f.Scalar(dtype=np.bool_)}
    steps = {
        "fractal20220817_data": {
            "observation": {"image": img, "natural_language_instruction": f.Text(),
                            "base_pose_tool_reached": vec(7), "gripper_closed": vec(1)},
            "action": {"world_vector": vec(3), "rotation_delta": vec(3), "gripper_closedness_action": vec(1),
                       "terminate_episode": f.Tensor(shape=(3,), dtype=np.int32)},
        },
        "bridge": {
            "observation": {"image": img, "state": vec(7), "natural_language_instruction": f.Text()},
            "action": {"world_vector": vec(3), "rotation_delta": vec(3), "open_gripper": f.Scalar(dtype=np.bool_)},
        },
        "bridge_dataset": {
            "observation": {"image_0": img, "image_1": img, "state": vec(7)},
            "action": vec(7), "language_instruction": f.Text(),
        },
        "language_table": {
            "observation": {"rgb": img, "effector_translation": vec(2),
                            "instruction": f.Tensor(shape=(512,), dtype=np.int32)},
            "action": vec(2),
        },
    }[name]
    return f.FeaturesDict({"steps": f.Dataset({**steps, **common})})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_match_published_specs(name):
    config = get_config(name)
    dataset = RLDSDataset(uri=f"/oxe/{name}", name=name, version="0.1.0", file_format="tfrecord",
                          features_json=published_spec(name).to_json(), dataset_info={}, shards=[])
    check_config(dataset, config)  # every key the config reads exists in the published spec
    assert config.state_dim and config.action_dim and config.control_frequency


def test_cli_generic_config_and_shipped_layout(ray_session, datasets, tmp_path, capsys):
    out = str(tmp_path / "store")
    argv = ["ingest", "rlds", datasets["tf3"].path, "--dataset", "my_robot", "--out", out,
            "--state-keys", "observation/state", "--action-keys", *OXE_DICT_ACTION,
            "--language-key", "language_instruction", "--image-keys", "observation/image"]
    assert cli_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["key"] == "steps/source=my_robot" and report["rows"] == datasets["tf3"].num_steps
    assert report["action_dim"] == 7 and not report["skipped"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["skipped"]
    # a shipped config on a dataset with another layout fails before any work, naming the keys
    assert cli_main(["ingest", "rlds", datasets["tf3"].path, "--dataset", "fractal20220817_data",
                     "--out", out, "--no-ray"]) == 2
    assert "observation/base_pose_tool_reached" in capsys.readouterr().err


def test_factory_features_are_oxe_like():
    features = rlds_features()
    step = features["steps"].feature
    assert set(step["action"].keys()) == {"world_vector", "rotation_delta", "gripper_closedness_action"}
    assert step["observation"]["image"].encoding_format == "jpeg"
    assert step["observation"]["wrist_image"].encoding_format == "png"


@pytest.mark.slow
def test_cli_ingest_metaworld_tiny(ray_session, tmp_path, capsys):
    config = tmp_path / "prior.yaml"
    config.write_text("success_per_task: 1\nfailed_per_task: 1\ntarget_demos: 1\nfailed_max_steps: 20\n")
    out = str(tmp_path / "store")
    argv = ["ingest", "metaworld", "--target", "reach-v3", "--tasks", "reach-v3", "button-press-v3",
            "--config", str(config), "--seed", "3", "--out", out]
    assert cli_main(argv) == 0
    capsys.readouterr()
    store = Store(out)
    assert store.manifest(steps_key("metaworld")).config["seed"] == 3
    assert store.manifest(steps_key("target-reach-v3")) is not None
    assert cli_main(argv) == 0  # rerun resumes: both outputs skipped
    info = json.loads(capsys.readouterr().out)
    assert info["prior"]["skipped"] and info["target"]["skipped"]
