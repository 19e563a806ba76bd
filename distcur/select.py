"""Scores -> selection: which prior steps to train on, with what weight.

A score table (:data:`distcur.schema.SCORE_SCHEMA`, one row per prior step) is grouped into
clusters at ``level``:

* ``step``     each step alone;
* ``subtraj``  windows of ``horizon`` steps within an episode, ``(source, episode, step // H)``;
* ``episode``  whole episodes, ``(source, episode)``.

A cluster's score is the mean of its steps' scores. Clusters are ranked by score, ties broken by
a permutation drawn from ``tie_seed`` (never by key order: a datamodel's LASSO zeros many clusters,
and key order would fill the budget in the order the prior was generated). Three rules:

* ``budget_percent`` (the default, 10): a share of the prior's *steps*. Clusters are taken in rank
  order until ``round(N * b / 100)`` steps are selected; the last cluster is cut to its first steps,
  so every method and granularity trains on the same amount of prior data;
* ``top_percent``: the top x% of *clusters* (``ceil(C * x / 100)``, at least one), whatever their size;
* ``threshold``: every cluster with score >= the threshold.

Every kept step enters the selection (:data:`distcur.schema.SELECTION_SCHEMA`) with weight 1
(``weighting="uniform"``) or the cluster score (``"score"``, scores must be >= 0).

The LeRobot-style export is a table of ``index, weight``: ``index`` is the global frame index
of the step when the prior's step tables are laid end to end, sources in the order recorded in
the export's manifest, episodes in increasing id, steps in order (LeRobot's ``index`` column).

Memory: the key and score columns of the score table (about 20 bytes per step) and, for the
export, one count per episode; the step tables themselves are only streamed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distcur.clusters import DEFAULT_HORIZON, episode_clusters
from distcur.composition import composition, selection_composition
from distcur.data import scores_key, selection_key, steps_key
from distcur.schema import SELECTION_SCHEMA
from distcur.sources.hdf5 import STAGE as HDF5_STAGE
from distcur.sources.lerobot import STAGE as LEROBOT_STAGE
from distcur.store import Manifest, Store

SELECT_LEVELS = ("step", "subtraj", "episode")
WEIGHTINGS = ("uniform", "score")
LEROBOT_SUFFIX = "lerobot"
LEROBOT_SCHEMA = pa.schema([pa.field("index", pa.int64(), nullable=False),
                            pa.field("weight", pa.float32(), nullable=False)])


DEFAULT_BUDGET_PERCENT = 10.0


@dataclass
class SelectConfig:
    """At most one of ``budget_percent`` (share of prior steps, 0 < b <= 100), ``top_percent``
    (share of clusters) and ``threshold``; none given means a budget of 10% of the steps."""

    budget_percent: float | None = None
    top_percent: float | None = None
    threshold: float | None = None
    level: str = "step"
    horizon: int = DEFAULT_HORIZON
    weighting: str = "uniform"
    tie_seed: int = 0

    def __post_init__(self) -> None:
        given = [n for n in ("budget_percent", "top_percent", "threshold") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"SelectConfig: give at most one of budget_percent, top_percent and threshold, got {given}")
        if not given:
            self.budget_percent = DEFAULT_BUDGET_PERCENT
        for name in ("budget_percent", "top_percent"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 100:
                raise ValueError(f"SelectConfig.{name} must be in (0, 100], got {value}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"SelectConfig.threshold must be finite, got {self.threshold}")
        if self.level not in SELECT_LEVELS:
            raise ValueError(f"SelectConfig.level must be one of {SELECT_LEVELS}, got {self.level!r}")
        if self.level == "subtraj" and self.horizon < 1:
            raise ValueError(f"SelectConfig.horizon must be >= 1, got {self.horizon}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"SelectConfig.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")


def cluster_scores(source_code: np.ndarray, episode: np.ndarray, step: np.ndarray, score: np.ndarray,
                   level: str, horizon: int = DEFAULT_HORIZON) -> tuple[np.ndarray, np.ndarray]:
    """Mean score per cluster.

    Args:
        source_code: (N,) int codes of the source (equal code = same source); episode, step,
        score: (N,). Returns (cluster (N,) int64 id per step, ordered by cluster key;
        cluster_score (C,) float64).
    """
    if level not in SELECT_LEVELS:
        raise ValueError(f"selection level must be one of {SELECT_LEVELS}, got {level!r}")
    cluster, _ = episode_clusters(source_code, episode, step, level, horizon)
    if not len(cluster):
        return cluster, np.zeros(0)
    order = np.argsort(cluster, kind="stable")  # each cluster's rows in table order
    counts = np.bincount(cluster)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return cluster, np.add.reduceat(np.asarray(score, np.float64)[order], starts) / counts


def rank_clusters(cluster_score: np.ndarray, tie_seed: int = 0) -> np.ndarray:
    """Cluster ids, best score first; equal scores in the order of a permutation drawn from ``tie_seed``."""
    tie = np.random.default_rng(tie_seed).permutation(len(cluster_score))
    return np.lexsort((tie, -np.asarray(cluster_score, np.float64)))


def select_clusters(cluster_score: np.ndarray, config: SelectConfig,
                    cluster_size: np.ndarray | None = None) -> np.ndarray:
    """(C,) int64 steps kept per cluster (0: dropped; below its size: the last, cut, cluster).

    ``cluster_size`` (C,) steps per cluster, needed by the budget rule (default: 1 each).
    """
    c = len(cluster_score)
    if not np.isfinite(cluster_score).all():
        raise ValueError(f"select: {int((~np.isfinite(cluster_score)).sum())} clusters have non-finite scores")
    size = np.ones(c, np.int64) if cluster_size is None else np.asarray(cluster_size, np.int64)
    if config.threshold is not None:
        return np.where(cluster_score >= config.threshold, size, 0)
    keep = np.zeros(c, np.int64)
    if not c:
        return keep
    order = rank_clusters(cluster_score, config.tie_seed)
    if config.top_percent is not None:
        n_keep = max(1, math.ceil(c * config.top_percent / 100.0 - 1e-9))
        keep[order[:n_keep]] = size[order[:n_keep]]
        return keep
    budget = max(1, int(round(size.sum() * config.budget_percent / 100.0)))
    before = np.cumsum(size[order]) - size[order]  # steps selected before each ranked cluster
    keep[order] = np.clip(budget - before, 0, size[order])
    return keep


def select_steps(scores: pa.Table, config: SelectConfig) -> pa.Table:
    """A selection table (SELECTION_SCHEMA, sorted by source, episode, step) from a score table."""
    missing = [c for c in ("source", "episode", "step", "score") if c not in scores.column_names]
    if missing:
        raise ValueError(f"select: score table lacks columns {missing}")
    source = pc.dictionary_encode(scores.column("source").combine_chunks())
    names = np.asarray(source.dictionary.to_pylist(), dtype=object)
    # codes ordered like the source names, so clusters sort by name
    rank = np.argsort(np.argsort(names.astype(str)))
    code = rank[source.indices.to_numpy(zero_copy_only=False)]
    episode = scores.column("episode").to_numpy().astype(np.int64)
    step = scores.column("step").to_numpy().astype(np.int32)
    score = scores.column("score").to_numpy().astype(np.float64)
    if not np.isfinite(score).all():
        row = int(np.argmin(np.isfinite(score)))
        raise ValueError(f"select: non-finite score at source={names[source.indices[row].as_py()]!r}, "
                         f"episode={episode[row]}, step={step[row]}")
    cluster, cscore = cluster_scores(code, episode, step, score, config.level, config.horizon)
    size = np.bincount(cluster, minlength=len(cscore))
    n_kept = select_clusters(cscore, config, size)
    # a cut cluster keeps its first steps: rank each step within its cluster by step order
    order = np.lexsort((step, cluster))
    first = np.zeros(len(cscore) + 1, np.int64)
    np.cumsum(size, out=first[1:])
    rank_in_cluster = np.empty(len(step), np.int64)
    rank_in_cluster[order] = np.arange(len(step)) - first[cluster[order]]
    rows = np.flatnonzero(rank_in_cluster < n_kept[cluster])
    kept = n_kept > 0
    if config.weighting == "score":
        if (cscore[kept] < 0).any():
            raise ValueError("select: weighting='score' needs non-negative scores; use weighting='uniform'")
        weight = cscore[cluster[rows]]
    else:
        weight = np.ones(len(rows))
    order = np.lexsort((step[rows], episode[rows], code[rows]))
    rows, weight = rows[order], weight[order]
    return pa.Table.from_arrays(
        [pa.array(names[source.indices.to_numpy(zero_copy_only=False)[rows]].astype(str), pa.string())
         if len(rows) else pa.array([], pa.string()),
         pa.array(episode[rows], pa.int64()), pa.array(step[rows], pa.int32()), pa.array(weight, pa.float32())],
        schema=SELECTION_SCHEMA,
    )


def run_select(store: Store, scores_run: str, out_run: str, config: SelectConfig | None = None,
               export_lerobot: bool = False, dense: bool = True, alpha: float | None = None,
               export_hdf5_mask: str | None = None) -> Manifest:
    """Select from ``scores/<scores_run>``; commit ``selections/<out_run>`` (and its LeRobot export)."""
    config = config or SelectConfig()
    in_key, out_key = scores_key(scores_run), selection_key(out_run)
    inputs = {in_key: store.input_fingerprint(in_key)}
    stage_config = dict(config.__dict__)
    if store.is_done(out_key, "select", stage_config, inputs):
        manifest = store.manifest(out_key)
    else:
        scores = store.read_table(in_key, columns=["source", "episode", "step", "score"])
        table = select_steps(scores, config)
        n_steps = scores.num_rows
        score_manifest = store.manifest(in_key)
        target = score_target(score_manifest)
        manifest = store.write_table(out_key, table, "select", stage_config, inputs, metadata={
            "scores": scores_run, "method": score_manifest.metadata.get("method"), "target": target,
            "sources": sorted(set(scores.column("source").unique().to_pylist())),
            **selection_metadata(store, table, n_steps, target),
        })
    if export_lerobot:
        export_lerobot_weights(store, out_run, dense=dense, alpha=alpha)
    if export_hdf5_mask:
        export_hdf5_masks(store, out_run, export_hdf5_mask)
    return manifest


def score_target(manifest: Manifest) -> str | None:
    """The target task a score run was made for (IWR names only its target embedding table)."""
    target = manifest.metadata.get("target") or manifest.config.get("target")
    key = str(manifest.config.get("target_key", ""))
    if not target and "source=target-" in key:
        target = key.split("source=target-", 1)[1].split("/", 1)[0]
    return target


def selection_metadata(store: Store, table: pa.Table, prior_steps: int, target: str | None) -> dict:
    """Size and make-up of a selection, for its manifest (every selection, baselines too)."""
    if not table.num_rows:
        comp: dict | None = composition_of_nothing()
    elif all(store.manifest(steps_key(s)) is not None for s in set(table.column("source").to_pylist())):
        comp = selection_composition(store, table, target)
    else:  # a score table brought without its step tables: nothing to describe the selection by
        comp = None
    return {"selected_steps": table.num_rows, "scored_steps": prior_steps,
            "selected_fraction": table.num_rows / prior_steps if prior_steps else 0.0, "composition": comp}


def composition_of_nothing() -> dict:
    return composition(np.zeros(0, str), np.zeros(0, bool), np.zeros(0, str), None)


def lerobot_key(run: str) -> str:
    return f"{selection_key(run)}/{LEROBOT_SUFFIX}"


def episode_offsets(store: Store, sources: list[str]) -> tuple[dict[str, tuple[int, np.ndarray, np.ndarray]], int]:
    """Per source: (first global index, sorted episode ids, global index of each episode's step 0); total frames."""
    out, offset = {}, 0
    for src in sources:
        counts: dict[int, int] = {}
        for rb in store.iter_batches(steps_key(src), columns=["episode"]):
            eps, n = np.unique(rb.column(0).to_numpy(), return_counts=True)
            for e, c in zip(eps.tolist(), n.tolist()):
                counts[e] = counts.get(e, 0) + c
        eps = np.array(sorted(counts), np.int64)
        lengths = np.array([counts[e] for e in eps.tolist()], np.int64)
        starts = offset + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(eps) else np.zeros(0, np.int64)
        out[src] = (offset, eps, starts.astype(np.int64))
        offset += int(lengths.sum())
    return out, offset


def export_lerobot_weights(store: Store, run: str, sources: list[str] | None = None, dense: bool = True,
                           alpha: float | None = None) -> Manifest:
    """Write ``selections/<run>/lerobot``: ``index, weight`` over the prior laid end to end.

    ``sources`` default to every source that was scored (recorded by :func:`run_select`). When
    they were ingested from LeRobot datasets (``distcur ingest lerobot``) the export is in the
    datasets' own frame order instead, see :func:`export_lerobot_native`. ``alpha`` (the target
    share of a co-training batch, :class:`distcur.policy.train.TrainConfig`) is recorded.
    """
    sel_key = selection_key(run)
    selection = store.read_table(sel_key)
    sel_sources = sorted(set(selection.column("source").to_pylist()))
    if sources is None:
        sources = store.manifest(sel_key).metadata.get("sources") or sel_sources
    sources = sorted(sources)
    unknown = sorted(set(sel_sources) - set(sources))
    if unknown:
        raise ValueError(f"export: selection {sel_key} has steps of sources {unknown} not in {sources}")
    inputs = {sel_key: store.input_fingerprint(sel_key), **{steps_key(s): store.input_fingerprint(steps_key(s))
                                                            for s in sources}}
    out_key = lerobot_key(run)
    native = {s: store.manifest(steps_key(s)) for s in sources}
    native = {s: m.metadata.get(s, {}) for s, m in native.items() if m is not None and m.stage == LEROBOT_STAGE}
    if native:
        if len(native) != len(sources):
            raise ValueError(f"export: sources {sorted(set(sources) - set(native))} were not ingested from a LeRobot "
                             f"dataset but {sorted(native)} were; export a selection of one kind at a time")
        return export_lerobot_native(store, out_key, selection, native, inputs, dense=dense, alpha=alpha)
    config = {"format": "lerobot", "sources": sources}
    if alpha is not None:
        config["alpha"] = alpha
    if store.is_done(out_key, "export", config, inputs):
        return store.manifest(out_key)
    offsets, total = episode_offsets(store, sources)
    src = np.asarray(selection.column("source").to_pylist(), dtype=object)
    episode = selection.column("episode").to_numpy().astype(np.int64)
    step = selection.column("step").to_numpy().astype(np.int64)
    index = np.empty(len(episode), np.int64)
    for s in sel_sources:
        rows = src == s
        _, eps, starts = offsets[s]
        pos = np.searchsorted(eps, episode[rows])
        bad = (pos >= len(eps)) | (eps[np.minimum(pos, len(eps) - 1)] != episode[rows])
        if bad.any():
            raise ValueError(f"export: selection {sel_key} names source={s!r}, episode={episode[rows][bad][0]} "
                             f"which is not in {steps_key(s)}")
        index[rows] = starts[pos] + step[rows]
    table = pa.Table.from_arrays([pa.array(index, pa.int64()), selection.column("weight").combine_chunks()],
                                 schema=LEROBOT_SCHEMA).sort_by("index")
    return store.write_table(out_key, table, "export", config, inputs, metadata={
        "index": "global frame index over the step tables of `sources` laid end to end, episodes in "
                 "increasing id, steps in order",
        "source_offsets": {s: int(offsets[s][0]) for s in sources},
        "total_frames": total,
        **({"alpha": alpha} if alpha is not None else {}),
    })


DEFAULT_ALPHA = 0.5  # TrainConfig.alpha's default: what a co-training run uses unless told
LEROBOT_NATIVE_SCHEMA = pa.schema([pa.field("source", pa.string(), nullable=False),
                                   pa.field("index", pa.int64(), nullable=False),
                                   pa.field("episode_index", pa.int64(), nullable=False),
                                   pa.field("frame_index", pa.int64(), nullable=False),
                                   pa.field("weight", pa.float32(), nullable=False)])


def _episode_table(meta: dict, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(episode_index, dataset_from_index, length) of a LeRobot-ingested source, by episode_index."""
    info = meta.get("episode_info") or {}
    if not info:
        raise ValueError(f"export: {steps_key(source)} records no episode_info; re-ingest it with distcur ingest lerobot")
    eps = np.array(sorted(int(k) for k in info), np.int64)
    frm = np.array([info[str(e)]["from_index"] for e in eps.tolist()], np.int64)
    length = np.array([info[str(e)]["length"] for e in eps.tolist()], np.int64)
    return eps, frm, length


def export_lerobot_native(store: Store, out_key: str, selection: pa.Table, metas: dict[str, dict],
                          inputs: dict[str, str], dense: bool = True, alpha: float | None = None) -> Manifest:
    """The export of a selection of LeRobot-ingested sources, in each dataset's own frame order.

    Rows ``source, index, episode_index, frame_index, weight`` where ``index`` is the dataset's own
    ``index`` column (``dataset_from_index`` of the episode + ``frame_index``, as ingest checked).
    ``dense`` (the default): every frame of every source, weight 0 where not selected; sparse: only
    the selected frames, and the manifest states the weight of the others (``fallback_weight``: 0).
    """
    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"export: alpha (target share) must be in [0, 1], got {alpha}")
    sources = sorted(metas)
    config = {"format": "lerobot-native", "sources": sources, "dense": bool(dense), "alpha": alpha}
    if store.is_done(out_key, "export", config, inputs):
        return store.manifest(out_key)
    src = np.asarray(selection.column("source").to_pylist(), dtype=object)
    episode = selection.column("episode").to_numpy().astype(np.int64)
    step = selection.column("step").to_numpy().astype(np.int64)
    weight = selection.column("weight").to_numpy().astype(np.float32)
    columns: dict[str, list] = {n: [] for n in LEROBOT_NATIVE_SCHEMA.names}
    for s in sources:
        eps, frm, length = _episode_table(metas[s], s)
        rows = src == s
        pos = np.searchsorted(eps, episode[rows])
        bad = (pos >= len(eps)) | (eps[np.minimum(pos, len(eps) - 1)] != episode[rows])
        bad |= ~bad & (step[rows] >= length[np.minimum(pos, len(eps) - 1)])
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"export: the selection names source={s!r}, episode={episode[rows][i]}, "
                             f"step={step[rows][i]}, which is not a frame of {steps_key(s)}")
        if dense:
            ep_col = np.repeat(eps, length)
            starts = np.concatenate([[0], np.cumsum(length)[:-1]])
            fi = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(starts, length)
            w = np.zeros(len(fi), np.float32)
            w[starts[pos] + step[rows]] = weight[rows]
            idx = np.repeat(frm, length) + fi
        else:
            ep_col, fi, w = episode[rows], step[rows], weight[rows]
            idx = frm[pos] + fi
        columns["source"].append(np.full(len(idx), s, dtype=object))
        columns["index"].append(idx)
        columns["episode_index"].append(ep_col)
        columns["frame_index"].append(fi)
        columns["weight"].append(w)
    table = pa.Table.from_arrays([pa.array(np.concatenate(v).tolist() if n == "source" else np.concatenate(v),
                                           LEROBOT_NATIVE_SCHEMA.field(n).type)
                                  for n, v in columns.items()], schema=LEROBOT_NATIVE_SCHEMA)
    table = table.sort_by([("source", "ascending"), ("index", "ascending")])
    return store.write_table(out_key, table, "export", config, inputs, metadata={
        "index": "the LeRobot dataset's own `index` column (dataset_from_index of the episode + frame_index)",
        "dense": bool(dense),
        "fallback_weight": 0.0,  # the weight of every frame the export does not list (sparse) or lists with 0
        "alpha": alpha,
        "alpha_meaning": "target share of each co-training batch (TrainConfig.alpha); the rest is drawn from the "
                         "prior frames by these weights",
        "datasets": {s: metas[s].get("root") for s in sources},
        "total_frames": {s: int(_episode_table(metas[s], s)[2].sum()) for s in sources},
        "selected_frames": int(selection.num_rows),
    })


def hdf5_mask_dir(run: str) -> str:
    return f"{selection_key(run)}/hdf5"


def export_hdf5_masks(store: Store, run: str, key: str) -> dict[str, list[str]]:
    """For each HDF5-ingested source of a selection: a COPY of each of its files, under
    ``selections/<run>/hdf5/<source>/``, with ``mask/<key>`` = the demos that have a selected step
    (weight > 0). The original files are only read. Returns {copy's URI: selected demo names}.
    """
    import os
    import tempfile

    from distcur.sources.hdf5 import write_mask_copy

    if not key or "/" in key:
        raise ValueError(f"export: --export-hdf5-mask needs a mask name without '/', got {key!r}")
    sel_key = selection_key(run)
    selection = store.read_table(sel_key)
    src = np.asarray(selection.column("source").to_pylist(), dtype=object)
    episode = selection.column("episode").to_numpy().astype(np.int64)
    weight = selection.column("weight").to_numpy()
    written: dict[str, list[str]] = {}
    hdf5_sources = []
    for s in sorted(set(src.tolist()) | set(store.manifest(sel_key).metadata.get("sources") or [])):
        m = store.manifest(steps_key(s))
        if m is None or m.stage != HDF5_STAGE:
            continue
        hdf5_sources.append(s)
        meta = m.metadata.get(s, {})
        info = meta.get("episode_info") or {}
        chosen = set(episode[(src == s) & (weight > 0)].tolist())
        by_file: dict[str, list[str]] = {f: [] for f in meta.get("files", [])}
        for e in sorted(chosen):
            if str(e) not in info:
                raise ValueError(f"export: the selection names source={s!r}, episode={e}, which {steps_key(s)} "
                                 "does not record")
            by_file.setdefault(info[str(e)]["file"], []).append(info[str(e)]["demo"])
        names = [os.path.basename(f) for f in by_file]
        for f, demos in by_file.items():
            name = os.path.basename(f) if names.count(os.path.basename(f)) == 1 else \
                f"{names.index(os.path.basename(f))}-{os.path.basename(f)}"
            rel = f"{hdf5_mask_dir(run)}/{s}/{name}"
            if store.is_local:
                write_mask_copy(f, store.path(rel), key, demos)
            else:
                with tempfile.TemporaryDirectory(prefix="distcur-hdf5-") as tmp:
                    local = os.path.join(tmp, name)
                    write_mask_copy(f, local, key, demos)
                    with open(local, "rb") as fh:
                        store.write_bytes(rel, fh.read())
            written[store.uri_of(rel)] = demos
    if not hdf5_sources:
        raise ValueError(f"export: --export-hdf5-mask: no source of selection {sel_key} was ingested from HDF5")
    return written
