"""The grid executors of distcur.distributed.kde: any block function, the same results either way."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pytest

from distcur.distributed.kde import RayDataGrid, TaskGrid, _score_block, grid_executor


def toy_functions():
    """A load, block function, reduction and writer defined here, so Ray pickles them by value (the
    workers cannot import a test module)."""

    def load(points: np.ndarray, refs_at: np.ndarray, probe_at: np.ndarray):
        carry = pa.table({"row": np.arange(len(points)), "offset": np.full(len(points), 0.5)})
        return points, carry, points[refs_at], points[probe_at]

    def dot_sums(queries: np.ndarray, refs: np.ndarray, h: float) -> np.ndarray:
        return (queries @ refs.T).sum(1) / h

    def total(partials: list[np.ndarray]) -> np.ndarray:
        return np.sum(partials, axis=0)

    def write(tag: str, block: int, carry: pa.Table, *reduced: np.ndarray):
        return tag, block, carry.column("row").to_pylist(), carry.column("offset").to_numpy() + reduced[0], len(reduced)

    return load, dot_sums, total, write


def test_task_grid_and_ray_data_reduce_every_block_against_every_shard(ray_session):
    _load, _dot_sums, _sum, _write = toy_functions()
    rng = np.random.default_rng(0)
    shards = [rng.normal(size=(n, 3)).astype(np.float32) for n in (5, 7, 4)]  # Ray Data keeps float32 points
    everything = np.concatenate(shards)
    loads = [(s, np.array([0, 1]), np.array([2])) for s in shards]
    out = {}
    for executor in (grid_executor("tasks"), grid_executor("ray-data")):
        for refs in ("own", "subsample"):
            out[executor.name, refs] = executor.grid(_load, loads, _dot_sums, _sum, functools.partial(_write, "t"),
                                                     [2.0, 4.0], refs=refs, probe_bandwidth=1.0)
    subsample = np.concatenate([s[:2] for s in shards])
    probe = np.stack([s[2] for s in shards])
    for (_, refs), result in out.items():
        against = everything if refs == "own" else subsample
        assert [r[1] for r in result.results] == [0, 1, 2]
        for shard, (tag, _, rows, value, n_reduced) in zip(shards, result.results):
            assert tag == "t" and rows == list(range(len(shard))) and n_reduced == 2
            np.testing.assert_allclose(value, 0.5 + (shard @ against.T).sum(1) / 2.0, rtol=1e-5)
        np.testing.assert_allclose(result.probe[0], (probe @ everything.T).sum(1), rtol=1e-5)
        np.testing.assert_allclose(result.probe[1], (probe @ against.T).sum(1), rtol=1e-5)
    assert out["tasks", "own"].tasks == {"load": 3, "pairs": 18, "combine": 6}
    assert out["ray-data", "own"].tasks == {"load": 3, "ray_data_query_blocks": 3}
    # the same reductions whichever executor ran them
    for refs in ("own", "subsample"):
        for a, b in zip(out["tasks", refs].results, out["ray-data", refs].results):
            assert np.array_equal(a[3], b[3])


def test_an_input_error_in_a_ray_data_block_is_raised_with_its_type(ray_session):
    _load, _dot_sums, _sum, _ = toy_functions()

    def write(block, carry, *reduced):
        raise FloatingPointError(f"block {block}: non-finite")

    with pytest.raises(FloatingPointError, match="block 0: non-finite"):
        RayDataGrid().grid(_load, [(np.ones((2, 2), np.float32), np.array([0]), np.array([0]))], _dot_sums, _sum, write, [1.0])
    assert isinstance(grid_executor(), TaskGrid)
    with pytest.raises(ValueError, match="unknown grid executor 'dask'"):
        grid_executor("dask")


def test_ray_data_block_refuses_a_batch_of_two_query_blocks():
    _, _dot_sums, _sum, _write = toy_functions()
    batch = pa.table({"block": [0, 1], "source": ["a", "a"], "episode": [0, 0], "step": [0, 1],
                      "y": pa.FixedSizeListArray.from_arrays(pa.array([0.0, 1.0], pa.float32()), 1),
                      "lse_target": [0.0, 0.0]})
    with pytest.raises(RuntimeError, match=r"spans query blocks \[0, 1\]; expected exactly one"):
        _score_block(batch, _write, [], _dot_sums, _sum, [1.0])
