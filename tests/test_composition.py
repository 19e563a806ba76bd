"""Overlaps between selections; paired differences between methods (a selection's make-up from the store:
tests/stages/test_select.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from distcur.composition import pairwise_jaccard
from distcur.schema import SELECTION_SCHEMA
from distcur.stats import paired_comparisons, paired_difference


def selection(rows: list[tuple[str, int, int]]) -> pa.Table:
    src, ep, st = zip(*rows)
    return pa.Table.from_arrays([pa.array(src, pa.string()), pa.array(ep, pa.int64()), pa.array(st, pa.int32()),
                                 pa.array(np.ones(len(rows)), pa.float32())], schema=SELECTION_SCHEMA)


def test_jaccard_between_selections():
    a = selection([("p", 0, i) for i in range(4)])
    b = selection([("p", 0, i) for i in range(2, 6)])
    out = pairwise_jaccard({"a": a, "b": b, "c": a})
    assert out["a"]["b"] == pytest.approx(2 / 6, abs=1e-4) and out["a"]["c"] == 1.0
    assert out["b"] == pytest.approx({"a": 2 / 6, "c": 2 / 6}, abs=1e-4)


def test_paired_difference_and_comparisons():
    d = paired_difference({0: 0.6, 1: 0.7, 2: 0.8}, {0: 0.5, 1: 0.5, 2: 0.6})
    assert d["mean"] == pytest.approx(0.1667, abs=1e-4) and d["seeds"] == 3
    # t(0.975, 2) = 4.303: the interval is mean +- 4.303 * s.e.
    assert d["ci"][1] - d["mean"] == pytest.approx(4.303 * d["se"], rel=1e-3)
    assert paired_difference({0: 0.5}, {0: 0.1, 1: 0.2})["seeds"] == 1
    rows = [{"method": m, "seed": s, "success": v} for m, vals in
            {"random": (0.5, 0.5, 0.6), "br": (0.6, 0.7, 0.8), "sr": (0.1, 0.2, 0.1), "dm": (0.9, 0.9, 0.9)}.items()
            for s, v in enumerate(vals)]
    cmp = paired_comparisons(pa.Table.from_pylist(rows))
    assert cmp["dm"]["best_similarity"]["reference"] == "br"
    assert cmp["dm"]["random"]["mean"] == pytest.approx(0.9 - 1.6 / 3)
    assert cmp["br"]["best_similarity"]["mean"] == 0.0
