"""What a selection is made of: why it works or does not.

For a selection (``source, episode, step`` rows) over prior step tables that carry ``task`` and
``success`` (the episode's outcome), the share of its steps

* from successful episodes (``success_share``),
* from the target task, and from the target task's *failed* attempts (``target_failure_share``),
* per task and per episode kind (``kinds``: ``success`` or the failure mode an ingest recorded in
  its manifest as ``episode_modes``; ``failed`` where none was recorded),

and the overlap (Jaccard index of the step sets) between selections. The maths works on arrays;
:func:`distcur.stages.select.selection_composition` reads what it needs from the store (four
narrow columns of the selected episodes only).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa


def step_codes(source: np.ndarray, episode: np.ndarray, step: np.ndarray, sources: list[str]) -> np.ndarray:
    """(N,) int64 code unique per (source, episode, step), for set operations over selections."""
    src_index = {s: i for i, s in enumerate(sources)}
    code = np.array([src_index[str(s)] for s in source], np.int64) if len(source) else np.zeros(0, np.int64)
    return (code << 52) | (np.asarray(episode, np.int64) << 20) | np.asarray(step, np.int64)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / |A | B| of two code arrays (1.0 for two empty sets)."""
    union = np.union1d(a, b)
    return float(len(np.intersect1d(a, b, assume_unique=False)) / len(union)) if len(union) else 1.0


def composition(task: np.ndarray, success: np.ndarray, kind: np.ndarray, target_task: str | None) -> dict:
    """Shares of selected steps, from per-step arrays of the selected steps (N,)."""
    n = len(task)
    if n == 0:
        return {"selected_steps": 0, "success_share": 0.0, "target_task_share": 0.0, "target_failure_share": 0.0,
                "tasks": {}, "kinds": {}}
    task = np.asarray(task).astype(str)
    success = np.asarray(success, bool)
    is_target = task == target_task if target_task else np.zeros(n, bool)

    def shares(labels: np.ndarray) -> dict[str, float]:
        names, counts = np.unique(labels, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        return {str(names[i]): round(float(counts[i] / n), 4) for i in order}

    return {"selected_steps": int(n), "success_share": round(float(success.mean()), 4),
            "target_task_share": round(float(is_target.mean()), 4),
            "target_failure_share": round(float((is_target & ~success).mean()), 4),
            "tasks": shares(task), "kinds": shares(np.asarray(kind).astype(str))}


def pairwise_jaccard(selections: Mapping[str, pa.Table]) -> dict[str, dict[str, float]]:
    """{method: {other method: Jaccard of their step sets}} over every pair of ``selections``."""
    sources = sorted({s for t in selections.values() for s in t.column("source").to_pylist()})
    codes = {m: step_codes(np.asarray(t.column("source").to_pylist(), dtype=object),
                           t.column("episode").to_numpy(), t.column("step").to_numpy(), sources)
             for m, t in selections.items()}
    names = list(codes)
    return {a: {b: round(jaccard(codes[a], codes[b]), 4) for b in names if b != a} for a in names}
