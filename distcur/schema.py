"""The canonical step table (docs/store.md) and its validation.

One row per environment step. ``episode`` is unique within ``source``; ``step`` counts from 0
within an episode. Per-source metadata (dims, action statistics, control frequency) lives in
the manifest, see :func:`source_metadata`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STEP_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("episode", pa.int64(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("state", pa.list_(pa.float32()), nullable=False),
        pa.field("action", pa.list_(pa.float32()), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("reward", pa.float32()),
        pa.field("is_first", pa.bool_(), nullable=False),
        pa.field("is_last", pa.bool_(), nullable=False),
        pa.field("is_terminal", pa.bool_(), nullable=False),
        pa.field("success", pa.bool_()),
    ]
)

STEP_COLUMNS = tuple(STEP_SCHEMA.names)


class StepValidationError(ValueError):
    """A step table that breaks the schema; the message names source, episode, step and column."""


def _where(source: str, episode: int | None = None, step: int | None = None, column: str | None = None) -> str:
    parts = [f"source={source!r}"]
    if episode is not None:
        parts.append(f"episode={episode}")
    if step is not None:
        parts.append(f"step={step}")
    if column is not None:
        parts.append(f"column={column!r}")
    return ", ".join(parts)


RowKeys = tuple  # (source: str | (n,) array, episode: (n,) array, step: (n,) array)


def describe_row(row: int, keys: RowKeys | None = None) -> str:
    """Where row ``row`` of an array comes from: its source, episode and step when the caller knows
    the array's keys (a row number alone cannot be looked up in the store), else the row number."""
    if keys is None:
        return f"row {row}"
    source, episode, step = keys
    return _where(str(source if isinstance(source, str) else source[row]), int(episode[row]), int(step[row]))


def steps_table(columns: dict[str, Sequence | np.ndarray | pa.Array]) -> pa.Table:
    """Build a step table from column data, filling optional columns with nulls.

    ``state`` and ``action`` may be 2-D float arrays (rows x dim) or lists of vectors.
    """
    n = len(columns["episode"])
    arrays = []
    for f in STEP_SCHEMA:
        value = columns.get(f.name)
        if value is None:
            if not f.nullable:
                raise StepValidationError(f"step table is missing required column {f.name!r}")
            arrays.append(pa.nulls(n, f.type))
            continue
        if f.name in ("state", "action") and isinstance(value, np.ndarray) and value.ndim == 2:
            flat = pa.array(np.ascontiguousarray(value, dtype=np.float32).ravel())
            offsets = pa.array(np.arange(0, value.shape[0] * value.shape[1] + 1, value.shape[1], dtype=np.int32))
            arrays.append(pa.ListArray.from_arrays(offsets, flat))
        elif f.name == "source" and isinstance(value, str):
            arrays.append(pa.array([value] * n, f.type))
        else:
            arrays.append(pa.array(value, f.type))
    return pa.Table.from_arrays(arrays, schema=STEP_SCHEMA)


def list_column_to_numpy(col: pa.ChunkedArray | pa.Array, name: str = "column") -> np.ndarray:
    """A list<float32> column of equal-length rows as an (n, dim) float32 array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise StepValidationError(f"{name}: rows have different lengths {sorted(set(lengths.tolist()))[:5]}")
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(col), int(lengths[0]))


def validate_steps(table: pa.Table, origin: str = "") -> pa.Table:
    """Check a step table and return it cast to :data:`STEP_SCHEMA`.

    Rejects: missing columns, NaN/inf in state/action/reward, inconsistent state or action
    dims within a source, steps out of order or with gaps, episodes whose first step is not
    ``is_first`` or whose last step is not ``is_last``. Errors name source, episode, step and
    column (and ``origin``, e.g. the file being ingested).
    """
    prefix = f"{origin}: " if origin else ""
    missing = [n for n in STEP_SCHEMA.names if n not in table.column_names]
    if missing:
        raise StepValidationError(f"{prefix}step table is missing columns {missing}; expected {STEP_COLUMNS}")
    table = table.select(list(STEP_SCHEMA.names))
    try:
        table = table.cast(STEP_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise StepValidationError(f"{prefix}step table does not cast to the step schema: {e}") from e
    if table.num_rows == 0:
        raise StepValidationError(f"{prefix}step table is empty")
    for name in ("source", "episode", "step", "state", "action", "is_first", "is_last", "is_terminal"):
        if table.column(name).null_count:
            raise StepValidationError(f"{prefix}column {name!r} has {table.column(name).null_count} nulls")

    sources = table.column("source").to_numpy(zero_copy_only=False)
    episodes = table.column("episode").to_numpy()
    steps = table.column("step").to_numpy()

    def row_where(i: int, column: str | None = None) -> str:
        return _where(str(sources[i]), int(episodes[i]), int(steps[i]), column)

    for column in ("state", "action"):
        col = table.column(column).combine_chunks()
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        values = col.flatten().to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(values)
        if bad.any():
            flat_index = int(np.argmax(bad))
            row = int(np.searchsorted(np.cumsum(lengths), flat_index, side="right"))
            raise StepValidationError(f"{prefix}non-finite value {values[flat_index]} at {row_where(row, column)}")
        for src in np.unique(sources):
            rows = np.flatnonzero(sources == src)
            dims = lengths[rows]
            if dims.min() != dims.max():
                first_bad = rows[np.argmax(dims != dims[0])]
                raise StepValidationError(
                    f"{prefix}inconsistent {column} dim at {row_where(first_bad, column)}: "
                    f"got {lengths[first_bad]}, expected {dims[0]} like the rest of source {src!r}"
                )
            if dims[0] == 0:
                raise StepValidationError(f"{prefix}empty {column} vectors at {row_where(rows[0], column)}")
    reward = table.column("reward").to_numpy(zero_copy_only=False)  # nulls become NaN
    valid = table.column("reward").is_valid().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(valid & ~np.isfinite(reward))
    if bad.size:
        raise StepValidationError(f"{prefix}non-finite reward {reward[bad[0]]} at {row_where(int(bad[0]), 'reward')}")

    # Order: within each (source, episode) rows are contiguous with step = 0, 1, 2, ...
    key_change = np.ones(len(steps), bool)
    key_change[1:] = (sources[1:] != sources[:-1]) | (episodes[1:] != episodes[:-1])
    starts = np.flatnonzero(key_change)
    seen: set[tuple[str, int]] = set()
    for s in starts:
        k = (str(sources[s]), int(episodes[s]))
        if k in seen:
            raise StepValidationError(
                f"{prefix}episode rows are not contiguous at {row_where(int(s))} (the episode appears twice)"
            )
        seen.add(k)
    expected = np.arange(len(steps)) - np.repeat(starts, np.diff(np.append(starts, len(steps))))
    wrong = np.flatnonzero(steps != expected)
    if wrong.size:
        i = int(wrong[0])
        raise StepValidationError(f"{prefix}step out of order at {row_where(i, 'step')}: expected step {expected[i]}")
    is_first = table.column("is_first").to_numpy(zero_copy_only=False)
    is_last = table.column("is_last").to_numpy(zero_copy_only=False)
    ends = np.append(starts[1:], len(steps)) - 1
    first_flag = np.zeros(len(steps), bool)
    first_flag[starts] = True
    last_flag = np.zeros(len(steps), bool)
    last_flag[ends] = True
    bad = np.flatnonzero(is_first != first_flag)
    if bad.size:
        i = int(bad[0])
        raise StepValidationError(
            f"{prefix}is_first is {bool(is_first[i])} at {row_where(i, 'is_first')}: expected it set exactly on step 0"
        )
    bad = np.flatnonzero(is_last != last_flag)
    if bad.size:
        i = int(bad[0])
        raise StepValidationError(
            f"{prefix}is_last is {bool(is_last[i])} at {row_where(i, 'is_last')}: expected it set exactly on the final step"
        )
    return table


def source_metadata(table: pa.Table) -> dict[str, dict]:
    """Per-source dims, step/episode counts and action statistics for a manifest."""
    out: dict[str, dict] = {}
    sources = table.column("source").to_numpy(zero_copy_only=False)
    for src in np.unique(sources):
        sub = table.filter(pc.equal(table.column("source"), src))
        state = list_column_to_numpy(sub.column("state"), "state")
        action = list_column_to_numpy(sub.column("action"), "action")
        out[str(src)] = {
            "state_dim": int(state.shape[1]),
            "action_dim": int(action.shape[1]),
            "steps": int(sub.num_rows),
            "episodes": int(len(np.unique(sub.column("episode").to_numpy()))),
            "action_mean": action.mean(0).round(6).tolist(),
            "action_std": action.std(0).round(6).tolist(),
            "action_min": action.min(0).tolist(),
            "action_max": action.max(0).tolist(),
        }
    return out


# A selection: which prior steps to train on and with what weight (docs/store.md,
# selections/<run>/selection.parquet). Produced by select / datamodel / rebalance, consumed by train.
SELECTION_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("episode", pa.int64(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
    ]
)

# Per-step scores of one method (scores/<run>/): higher = more useful for the target.
SCORE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("episode", pa.int64(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
    ]
)

# Per-step embeddings (embeddings/<encoder>/source=<source>/).
EMBEDDING_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("episode", pa.int64(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("z", pa.list_(pa.float32()), nullable=False),
    ]
)
