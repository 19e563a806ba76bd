"""The ingest executors on a real local Ray: a handed callable mapped over shards as Ray Data tasks
(one result per shard, the handed user-error types raised as themselves), and over items as Ray
tasks (results in order). The callables are made inside the tests, so Ray ships them by value (a worker cannot import
a test module)."""

from __future__ import annotations

import pytest

from distcur.distributed.ingest import RayDataShards
from distcur.distributed.metaworld import RayTasks


def _callables():
    class BadInput(ValueError):
        """A user's bad input: an executor raises it as itself."""

    def square(x: int) -> dict:
        return {"shard": x, "value": x * x}

    def fail_on_three(x: int) -> int:
        if x == 3:
            raise BadInput(f"shard {x}: column 'state' is a string (file f{x}.parquet)")
        return x

    def crash(x: int) -> int:
        raise KeyError(f"bug in shard {x}")

    return BadInput, square, fail_on_three, crash


def test_ray_data_maps_every_shard_and_raises_the_handed_error_types(ray_session):
    bad_input, square, fail_on_three, _ = _callables()
    results = list(RayDataShards(progress=False)(square, [4, 1, 3, 2]))  # in any order: the stage sorts by shard
    assert sorted((r["shard"], r["value"]) for r in results) == [(1, 1), (2, 4), (3, 9), (4, 16)]
    with pytest.raises(bad_input, match=r"^shard 3: column 'state' is a string \(file f3.parquet\)$"):
        list(RayDataShards(progress=False)(fail_on_three, [1, 2, 3], errors=(bad_input,)))
    # an error type not handed in is not a user's error: it propagates as Ray's own failure, not as itself
    with pytest.raises(Exception) as info:
        list(RayDataShards(progress=False)(fail_on_three, [3], errors=()))
    assert not isinstance(info.value, bad_input) and "shard 3" in str(info.value)


def test_ray_tasks_map_in_order_and_reraise_user_errors(ray_session):
    bad_input, square, fail_on_three, crash = _callables()
    assert RayTasks(progress=False)(square, [3, 1, 2]) == [square(3), square(1), square(2)]
    with pytest.raises(bad_input, match=r"^shard 3: column 'state'"):
        RayTasks(progress=False, errors=(bad_input,))(fail_on_three, [1, 3])
    with pytest.raises(Exception) as info:
        RayTasks(progress=False, errors=(bad_input,))(crash, [5])
    assert not isinstance(info.value, bad_input) and "bug in shard 5" in str(info.value)
