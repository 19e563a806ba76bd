"""A user's own Parquet / Arrow step table mapped onto the canonical one; errors name file and column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from distcur.cli import main as cli_main
from distcur.data import steps_key
from distcur.distributed.ingest import ray_mapper
from distcur.schema import StepValidationError
from distcur.sources.common import SourceFormatError
from distcur.sources.parquet import parse_mapping
from distcur.store import Store
from tests.ingest_calls import ingest_parquet

SOURCE = "mine"
MAP = ["state=obs.state", "action=a0,a1", "episode=ep_id", "step=t", "task=instruction", "reward=r"]


def user_table(episodes: range, seed: int = 0, shuffle: bool = True) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for e in episodes:
        for t in range(3 + e % 3):
            rows.append({"ep_id": e, "t": t, "obs.state": rng.normal(size=4).astype(np.float32).tolist(),
                         "a0": float(rng.normal()), "a1": float(rng.normal()), "instruction": f"task {e % 2}",
                         "r": float(t), "other": "ignored"})
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    pq.write_table(user_table(range(0, 4), seed=1), root / "a.parquet")
    feather.write_feather(user_table(range(4, 7), seed=2), str(root / "b.arrow"))
    return root


def expected(table: pa.Table, episode: int):
    d = table.to_pydict()
    rows = sorted((t, i) for i, (e, t) in enumerate(zip(d["ep_id"], d["t"])) if e == episode)
    idx = [i for _, i in rows]
    return (np.array([d["obs.state"][i] for i in idx], np.float32),
            np.array([[d["a0"][i], d["a1"][i]] for i in idx], np.float32), [d["instruction"][i] for i in idx])


def test_folder_in_process_and_ray_give_the_same_table(ray_session, folder, tmp_path):
    store = Store(tmp_path / "store")
    r = ingest_parquet(str(folder), store, SOURCE, MAP, progress=False)
    t1 = store.read_table(steps_key(SOURCE))
    ingest_parquet(str(folder), store, SOURCE, MAP, executor=ray_mapper(progress=False), force=True, progress=False)
    assert store.read_table(steps_key(SOURCE)).equals(t1)
    meta = r.manifest.metadata[SOURCE]
    assert (meta["state_dim"], meta["action_dim"], meta["episodes"]) == (4, 2, 7)
    assert meta["episode_info"]["5"]["file"].endswith("b.arrow")
    a = pq.read_table(folder / "a.parquet")
    state, action, task = expected(a, 2)
    rows = t1.filter(t1.column("episode").to_numpy() == 2).to_pydict()
    np.testing.assert_array_equal(np.array(rows["state"], np.float32), state)
    np.testing.assert_array_equal(np.array(rows["action"], np.float32), action)
    assert rows["task"] == task and rows["step"] == list(range(len(task)))
    assert rows["reward"] == [float(t) for t in range(len(task))]
    assert rows["is_first"][0] and rows["is_last"][-1]
    assert ingest_parquet(str(folder), store, SOURCE, MAP, progress=False).skipped


def test_mapping_errors():
    with pytest.raises(ValueError, match=r"must map \['action'\]"):
        parse_mapping(["state=s", "episode=e"])
    with pytest.raises(ValueError, match="unknown canonical column 'stat'"):
        parse_mapping(["stat=s", "episode=e", "action=a", "state=s"])


def _write(tmp_path, table, name="bad.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


def test_bad_input_names_file_and_column_and_keeps_the_committed_table(folder, tmp_path):
    store = Store(tmp_path / "store")
    good = ingest_parquet(str(folder / "a.parquet"), store, SOURCE, MAP, progress=False).manifest
    base = user_table(range(2), seed=3, shuffle=False)

    path = _write(tmp_path, base.drop_columns(["a1"]))
    with pytest.raises(SourceFormatError, match=r"bad.parquet: missing column\(s\) \['a1'\] named by --map"):
        ingest_parquet(path, store, SOURCE, MAP, force=True, progress=False)

    state = base.column("obs.state").to_pylist()
    state[4][2] = float("nan")
    path = _write(tmp_path, base.set_column(base.schema.get_field_index("obs.state"), "obs.state", pa.array(state)))
    with pytest.raises(StepValidationError,
                       match=r"bad.parquet, episode 1: non-finite value nan .*column='state'.*from your column 'obs.state'"):
        ingest_parquet(path, store, SOURCE, MAP, force=True, progress=False)

    state = base.column("obs.state").to_pylist()
    state[1] = state[1][:3]
    path = _write(tmp_path, base.set_column(base.schema.get_field_index("obs.state"), "obs.state", pa.array(state)))
    with pytest.raises(SourceFormatError, match=r"bad.parquet: column 'state' \(from 'obs.state'\): list column "
                                                r"'obs.state' has length 3 at row 1, expected 4"):
        ingest_parquet(path, store, SOURCE, MAP, force=True, progress=False)

    path = _write(tmp_path, base.slice(0, 0))
    with pytest.raises(SourceFormatError, match=r"bad.parquet: empty file"):
        ingest_parquet(path, store, SOURCE, MAP, force=True, progress=False)

    t = base.column("t").to_pylist()
    t[1] = 5
    path = _write(tmp_path, base.set_column(base.schema.get_field_index("t"), "t", pa.array(t)))
    with pytest.raises(SourceFormatError, match=r"bad.parquet, episode 0: column 'step' \(from 't'\)"):
        ingest_parquet(path, store, SOURCE, MAP, force=True, progress=False)

    dup = tmp_path / "dup"
    dup.mkdir()
    pq.write_table(base, dup / "x.parquet")
    pq.write_table(base, dup / "y.parquet")
    with pytest.raises(SourceFormatError, match=r"episode 0 is in two files, .*x.parquet and .*y.parquet"):
        ingest_parquet(str(dup), store, SOURCE, MAP, force=True, progress=False)

    assert store.manifest(steps_key(SOURCE)).files == good.files
    assert store.read_table(steps_key(SOURCE)).num_rows == good.rows


def test_cli_ingest_parquet(folder, tmp_path, capsys):
    out = tmp_path / "store"
    assert cli_main(["ingest", "parquet", str(folder / "a.parquet"), "--source", SOURCE, "--out", str(out),
                     "--no-ray", "--map", *MAP]) == 0
    assert Store(out).manifest(steps_key(SOURCE)).metadata[SOURCE]["episodes"] == 4
    capsys.readouterr()
    assert cli_main(["ingest", "parquet", str(folder / "a.parquet"), "--source", SOURCE, "--out", str(out),
                     "--no-ray", "--map", "state=nope", "action=a0", "episode=ep_id"]) == 2
    assert "missing column(s) ['nope']" in capsys.readouterr().err
