"""What a selection is made of: why it works or does not.

For a selection (``source, episode, step`` rows) over prior step tables that carry ``task`` and
``success`` (the episode's outcome), the share of its steps

* from successful episodes (``success_share``),
* from the target task, and from the target task's *failed* attempts (``target_failure_share``),
* per task and per episode kind (``kinds``: ``success`` or the failure mode an ingest recorded in
  its manifest as ``episode_modes``; ``failed`` where none was recorded),

and the overlap (Jaccard index of the step sets) between selections. The maths works on arrays;
:func:`selection_composition` reads what it needs from the store (four narrow columns of the
selected episodes only).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from distcur.data import steps_key
from distcur.store import Store


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


def selection_composition(store: Store, selection: pa.Table, target_task: str | None) -> dict:
    """:func:`composition` of a selection table, reading ``task`` and ``success`` of its episodes."""
    src = np.asarray(selection.column("source").to_pylist(), dtype=object)
    ep = selection.column("episode").to_numpy().astype(np.int64)
    st = selection.column("step").to_numpy().astype(np.int64)
    task = np.empty(len(ep), dtype=object)
    success = np.zeros(len(ep), bool)
    kind = np.empty(len(ep), dtype=object)
    for source in sorted(set(src.tolist())):
        rows = np.flatnonzero(src == source)
        key = steps_key(source)
        manifest = store.manifest(key)
        if manifest is None:
            raise FileNotFoundError(f"composition: the selection names source {source!r} but {store.uri_of(key)} "
                                    "has no committed step table")
        wanted = ["episode", "step", "task", "success"]
        episodes = np.unique(ep[rows]).tolist()
        table = store.read_table(key, columns=wanted, filters=[("episode", "in", episodes)])
        t_ep = table.column("episode").to_numpy().astype(np.int64)
        t_st = table.column("step").to_numpy().astype(np.int64)
        order = np.lexsort((t_st, t_ep))
        t_ep, t_st = t_ep[order], t_st[order]
        pos = np.searchsorted(t_ep * (1 << 32) + t_st, ep[rows] * (1 << 32) + st[rows])
        pos = np.minimum(pos, max(len(t_ep) - 1, 0))
        missing = (np.ones(len(rows), bool) if not len(t_ep)
                   else (t_ep[pos] != ep[rows]) | (t_st[pos] != st[rows]))
        if missing.any():
            i = rows[np.argmax(missing)]
            raise ValueError(f"composition: selection row source={source!r}, episode={ep[i]}, step={st[i]} is not "
                             f"in {store.uri_of(key)}")
        task[rows] = np.asarray(table.column("task").to_pylist(), dtype=object)[order][pos]
        success[rows] = table.column("success").to_numpy(zero_copy_only=False)[order][pos]
        modes = manifest.metadata.get("episode_modes")
        if modes:
            kind[rows] = np.asarray(modes, dtype=object)[ep[rows]]
        else:
            kind[rows] = np.where(success[rows], "success", "failed")
    return composition(task, success, kind, target_task)


def pairwise_jaccard(selections: Mapping[str, pa.Table]) -> dict[str, dict[str, float]]:
    """{method: {other method: Jaccard of their step sets}} over every pair of ``selections``."""
    sources = sorted({s for t in selections.values() for s in t.column("source").to_pylist()})
    codes = {m: step_codes(np.asarray(t.column("source").to_pylist(), dtype=object),
                           t.column("episode").to_numpy(), t.column("step").to_numpy(), sources)
             for m, t in selections.items()}
    names = list(codes)
    return {a: {b: round(jaccard(codes[a], codes[b]), 4) for b in names if b != a} for a in names}
