"""The task executors on a real local Ray: a handed callable mapped over shards as Ray Data tasks
(one result per shard, the handed user-error types raised as themselves), and the one Ray-task
executor every stage uses (in order, as they arrive, failures kept or raised, references chained).
The callables are made inside the tests, so Ray ships them by value (a worker cannot import a
test module)."""

from __future__ import annotations

import pytest

from distcur.distributed.ingest import RayDataShards
from distcur.distributed.tasks import RayTasks, failures


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


def test_ray_tasks_each_hands_results_over_as_they_arrive_and_keeps_going_past_failures(ray_session):
    bad_input, square, fail_on_three, crash = _callables()
    tasks = RayTasks(errors=(bad_input,))
    seen = []
    rows = tasks.each(square, [(2,), (5,)], on_result=lambda i, r: seen.append((i, r["value"])))
    assert rows == [square(2), square(5)] and sorted(seen) == [(0, 4), (1, 25)]
    # keep_going: every call runs; a failed one has its exception in its place, on_result skips it
    seen.clear()
    results = tasks.each(fail_on_three, [(1,), (3,), (4,)], on_result=lambda i, r: seen.append(i), keep_going=True)
    assert results[0] == 1 and results[2] == 4 and isinstance(results[1], bad_input) and sorted(seen) == [0, 2]
    assert list(failures(results)) == [1] and "column 'state'" in failures(results)[1]
    # an error type not handed in is kept as Ray's own failure, its message naming the cause
    crashed = tasks.each(crash, [(7,)], keep_going=True)
    assert not isinstance(crashed[0], bad_input) and "bug in shard 7" in failures(crashed)[0]
    with pytest.raises(bad_input, match="shard 3"):
        tasks.each(fail_on_three, [(3,)])
    assert tasks.map(square, []) == [] and tasks.each(square, []) == []


def test_ray_tasks_submit_chains_references_without_the_driver(ray_session):
    _, square, _, _ = _callables()
    tasks = RayTasks()
    first = tasks.submit(square, 3)
    pick = tasks.submit(lambda row, k: row[k], first, "value")  # a reference among the args arrives as its value
    assert tasks.get(pick) == 9 and tasks.get(tasks.put([1, 2])) == [1, 2]
    both = tasks.submit(lambda x: (x, -x), 4, num_returns=2)
    assert tasks.get(list(both)) == [4, -4]
