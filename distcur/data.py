"""Step tables as numpy arrays, for the stages that fit a (sub)set of steps in memory.

Training, scoring against the target set and the datamodels all work on arrays of states and
actions keyed by (source, episode, step). Streaming stages (ingest, embedding, KDE partial sums)
read the store part by part instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distcur.schema import list_column_to_numpy
from distcur.store import Store

STEPS_PREFIX = "steps"


def steps_key(source: str) -> str:
    """Store key of one source's step table."""
    return f"{STEPS_PREFIX}/source={source}"


TARGET_PREFIX = "target-"


def target_source(task: str) -> str:
    """Source name of the target demonstrations of ``task`` (kept apart from the prior)."""
    return f"{TARGET_PREFIX}{task}"


def heldout_source(task: str) -> str:
    """Source of the held-out target demos that define the reported proxy loss.

    It starts with ``target-`` so no stage mistakes it for prior data."""
    return f"{target_source(task)}-heldout"


def is_target_source(source: str) -> bool:
    """A target set (``target-<task>``, its held-out demos included), never prior data."""
    return source.startswith(TARGET_PREFIX)


def embeddings_key(encoder: str, source: str) -> str:
    return f"embeddings/{encoder}/source={source}"


def scores_key(run: str) -> str:
    return f"scores/{run}"


def selection_key(run: str) -> str:
    return f"selections/{run}"


def policy_key(run: str) -> str:
    return f"policies/{run}"


def eval_key(run: str) -> str:
    return f"evals/{run}"


def datamodel_key(run: str, part: str = "") -> str:
    """``datamodels/<run>[/<part>]``: a datamodel run's tables (``tau``, ``masks``, ``results``, ...)."""
    return f"datamodels/{run}" + (f"/{part}" if part else "")


def sweep_key(run: str) -> str:
    return f"sweeps/{run}"


def list_sources(store: Store) -> list[str]:
    """Sources with a committed step table in ``store``."""
    names = [n for n in store.listdir(STEPS_PREFIX) if n.startswith("source=")]
    return [n[len("source="):] for n in names if store.manifest(f"{STEPS_PREFIX}/{n}") is not None]


def default_prior_sources(store: Store, prior_sources: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The given prior sources, or every ingested source in the store that is not a ``target-*`` set."""
    sources = prior_sources if prior_sources is not None else [s for s in list_sources(store)
                                                               if not is_target_source(s)]
    if not sources:
        raise FileNotFoundError(f"no prior step tables under {store.uri_of(STEPS_PREFIX)} (only target-* sources?)")
    return list(sources)


def source_metadata_of(store: Store, source: str) -> dict:
    """The per-source metadata an ingest recorded in the manifest of ``steps/source=<source>``
    (dims, action statistics, format and action fields; :func:`distcur.schema.source_metadata`)."""
    m = store.manifest(steps_key(source))
    if m is None:
        raise FileNotFoundError(f"no committed step table at {store.uri_of(steps_key(source))}")
    meta = m.metadata.get(source) or (m.metadata.get("sources") or {}).get(source)
    if not isinstance(meta, dict) or "action_mean" not in meta or "action_std" not in meta:
        raise ValueError(f"{store.uri_of(steps_key(source))}/manifest.json: no action statistics (action_mean, "
                         f"action_std) for source {source!r} in its metadata; re-ingest it with this distcur version")
    return {**meta, "stage": m.stage}


def action_space_of(meta: dict) -> tuple:
    """What an action vector of a source means, from its manifest metadata: the ingest stage, the
    fields the action was built from (RLDS action_keys, HDF5 / LeRobot action_key, a Parquet mapping)
    and its width. Sources with equal tuples share one action space."""
    fields = meta.get("action_keys") or meta.get("action_key") or (meta.get("map") or {}).get("action")
    fields = tuple(fields) if isinstance(fields, list | tuple) else fields
    return meta.get("stage"), meta.get("dataset"), fields, int(meta["action_dim"])


@dataclass
class StepArrays:
    """Columns of a step table as arrays; row i is step ``step[i]`` of ``(source[i], episode[i])``."""

    source: np.ndarray  # (N,) object (str)
    episode: np.ndarray  # (N,) int64
    step: np.ndarray  # (N,) int32
    task: np.ndarray  # (N,) object (str)
    state: np.ndarray  # (N, ds) float32
    action: np.ndarray  # (N, da) float32
    success: np.ndarray  # (N,) bool (False where unknown)
    is_first: np.ndarray  # (N,) bool
    is_last: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.episode)

    @classmethod
    def from_table(cls, table: pa.Table) -> StepArrays:
        def col(name, dtype=None):
            arr = table.column(name).to_numpy(zero_copy_only=False)
            return arr.astype(dtype) if dtype is not None else arr

        success = table.column("success").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        return cls(
            source=col("source").astype(object),
            episode=col("episode", np.int64),
            step=col("step", np.int32),
            task=table.column("task").fill_null("").to_numpy(zero_copy_only=False).astype(object),
            state=list_column_to_numpy(table.column("state"), "state"),
            action=list_column_to_numpy(table.column("action"), "action"),
            success=success,
            is_first=col("is_first", bool),
            is_last=col("is_last", bool),
        )

    def take(self, idx: np.ndarray) -> StepArrays:
        return StepArrays(**{k: v[idx] for k, v in self.__dict__.items()})

    @classmethod
    def concat(cls, parts: list[StepArrays]) -> StepArrays:
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__})

    def episode_ids(self) -> np.ndarray:
        """A dense id per (source, episode), in row order of first appearance, (N,) int64."""
        keys = np.char.add(self.source.astype(str), np.char.add("\x00", self.episode.astype(str)))
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first))
        return order[inverse].astype(np.int64)


# The step columns StepArrays holds: what load_steps reads (never ``image``, ``reward``, ...).
ARRAY_COLUMNS = ("source", "episode", "step", "task", "state", "action", "success", "is_first", "is_last")


def load_steps(store: Store, sources: list[str] | None = None, columns_filter=None) -> StepArrays:
    """All steps of ``sources`` (default: every source in the store) as arrays; reads only
    :data:`ARRAY_COLUMNS` (camera images stay in the store)."""
    sources = sources if sources is not None else list_sources(store)
    if not sources:
        raise FileNotFoundError(f"no step tables under {store.uri_of(STEPS_PREFIX)}")
    parts = [StepArrays.from_table(store.read_table(steps_key(s), columns=list(ARRAY_COLUMNS),
                                                    filters=columns_filter)) for s in sources]
    return StepArrays.concat(parts)
