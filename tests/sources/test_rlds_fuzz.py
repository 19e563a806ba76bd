"""Property-based tests of the RLDS readers: random damage to a TFRecord or array_record shard (bytes
flipped, zeroed, cut, appended, the file emptied) ends in an :class:`RLDSFormatError` that names the
damaged file, or in a read equal to the undamaged one; never another exception, a hang, or a
silently different table. What was committed before stays intact either way."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ingest_calls import ingest_rlds  # noqa: E402
from rlds_factory import make_rlds_dataset  # noqa: E402

from distcur.data import steps_key  # noqa: E402
from distcur.sources.rlds import RLDSFormatError  # noqa: E402
from distcur.sources.rlds_configs import OXE_DICT_ACTION, RLDSConfig  # noqa: E402
from distcur.store import Store  # noqa: E402

SOURCE = "factory"
CONFIG = RLDSConfig(name="factory_rlds", state_keys=("observation/state",), action_keys=OXE_DICT_ACTION,
                    language_key="language_instruction", image_keys=("observation/image",), action_dim=7)
FORMATS = {"tfrecord": (2, CONFIG),
           "array_record": (2, RLDSConfig(**{**CONFIG.to_dict(),
                                             "language_key": "observation/natural_language_instruction"}))}
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlds-fuzz")
    out = {}
    for fmt, (shards, _) in FORMATS.items():
        ds = make_rlds_dataset(root / fmt, file_format=fmt, num_shards=shards, num_episodes=4, seed=3,
                               language_in_observation=fmt == "array_record")
        store = Store(root / f"{fmt}-store")
        ingest_rlds(ds.path, FORMATS[fmt][1], store, source=SOURCE, progress=False)
        out[fmt] = (ds, store.read_table(steps_key(SOURCE)))
    return out


@st.composite
def damage(draw, size: int):
    """(kind, description, function of the shard's bytes)."""
    kind = draw(st.sampled_from(["flip", "zero", "truncate", "append", "empty"]))
    at = draw(st.integers(0, size - 1))
    if kind == "flip":
        mask = draw(st.integers(1, 255))
        return kind, f"byte {at} ^ {mask}", lambda b: b[:at] + bytes([b[at] ^ mask]) + b[at + 1:]
    if kind == "zero":
        n = draw(st.integers(1, 64))
        return kind, f"{n} bytes zeroed at {at}", lambda b: b[:at] + bytes(len(b[at:at + n])) + b[at + n:]
    if kind == "truncate":
        return kind, f"cut at {at}", lambda b: b[:at]
    if kind == "append":
        junk = draw(st.binary(min_size=1, max_size=32))
        return kind, f"{len(junk)} bytes appended", lambda b: b + junk
    return kind, "emptied", lambda b: b""


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@FUZZ
@given(data=st.data())
def test_damaged_shard_is_named_or_read_correctly(datasets, fmt, tmp_path_factory, data):
    ds, expected = datasets[fmt]
    shards, config = FORMATS[fmt]
    work = tmp_path_factory.mktemp("case")
    path = str(work / "ds")
    shutil.copytree(ds.path, path)
    index = data.draw(st.integers(0, shards - 1), label="shard")
    name = f"factory_rlds-train.{fmt}-{index:05d}-of-{shards:05d}"
    shard = os.path.join(path, name)
    with open(shard, "rb") as f:
        original = f.read()
    kind, what, apply = data.draw(damage(len(original)), label="damage")
    damaged = apply(original)
    with open(shard, "wb") as f:
        f.write(damaged)

    store = Store(work / "store")
    good = store.write_table(steps_key(SOURCE), expected, stage="ingest-rlds")  # what is there must survive
    try:
        ingest_rlds(path, config, store, source=SOURCE, progress=False, force=True)
    except RLDSFormatError as e:
        assert name in str(e), f"{what}: the error does not name the damaged shard: {e}"
        assert store.manifest(steps_key(SOURCE)).to_json() == good.to_json(), f"{what}: the committed table changed"
        event(f"{kind}: clear error")
        return
    # read without error: only right when the damage did not change what the shard holds
    got = store.read_table(steps_key(SOURCE))
    assert got.equals(expected), f"{what}: read {got.num_rows} rows without an error, not the shard's data"
    event(f"{kind}: read correctly ({what})")
