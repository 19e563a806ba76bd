"""The select stage: a score run -> ``selections/<run>``, and its LeRobot / HDF5-mask exports.

The selection maths (clusters, budgets, tie-breaking) is :mod:`distcur.select`; this module reads
the score table, commits the selection with its make-up (:func:`selection_composition`, from the
step tables' ``task`` and ``success``) and writes the exports.

The LeRobot-style export is a table of ``index, weight``: ``index`` is the global frame index
of the step when the prior's step tables are laid end to end, sources in the order recorded in
the export's manifest, episodes in increasing id, steps in order (LeRobot's ``index`` column).

Memory: the key and score columns of the score table (about 20 bytes per step) and, for the
export, one count per episode; the step tables themselves are only streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from distcur.composition import composition
from distcur.data import scores_key, selection_key, steps_key
from distcur.select import SelectConfig, select_steps
from distcur.sources.hdf5 import STAGE as HDF5_STAGE
from distcur.sources.lerobot import STAGE as LEROBOT_STAGE
from distcur.stages.output import commit_table
from distcur.store import Manifest, Store

LEROBOT_SUFFIX = "lerobot"
LEROBOT_SCHEMA = pa.schema([pa.field("index", pa.int64(), nullable=False),
                            pa.field("weight", pa.float32(), nullable=False)])


@dataclass
class ExportOptions:
    """What the select stage writes besides the selection."""

    lerobot: bool = field(default=False, metadata={
        "help": "also write selections/<run>/lerobot: (index, weight); for LeRobot-ingested sources the dataset's "
                "own index with episode_index and frame_index, every frame (weight 0 unselected)"})
    sparse: bool = field(default=False, metadata={
        "help": "LeRobot export of the selected frames only (the manifest states the others' weight, 0)"})
    alpha: float | None = field(default=None, metadata={
        "help": "target share of a co-training batch, recorded with the LeRobot export (default 0.5)"})
    hdf5_mask: str | None = field(default=None, metadata={
        "help": "for HDF5-ingested sources: copies of the files under selections/<run>/hdf5/ with mask/KEY = the "
                "selected demos (the originals are never written)"})


@dataclass
class SelectStageConfig:
    """One select run: ``selection`` applied to ``scores/<scores>``, committed as ``selections/<run>``,
    with the ``export`` options."""

    scores: str = field(default="", metadata={"help": "score run to select from (scores/<run>)"})
    run: str = field(default="", metadata={"help": "output run name: writes selections/<run>"})
    # None, not a default instance: SelectConfig fills in the 10% budget when no budget is given, and a
    # partial `selection: {threshold: 20}` must not be merged onto an instance with that budget filled
    selection: SelectConfig = field(default=None, metadata={"help": "the selection's options (SelectConfig)"})
    export: ExportOptions = field(default_factory=ExportOptions)

    def __post_init__(self) -> None:
        for name in ("scores", "run"):
            if not getattr(self, name):
                raise ValueError(f"SelectStageConfig.{name} is required (--{name})")
        if self.selection is None or isinstance(self.selection, dict):
            self.selection = SelectConfig(**(self.selection or {}))
        if isinstance(self.export, dict):
            self.export = ExportOptions(**self.export)
        if self.export.sparse and not self.export.lerobot:
            raise ValueError("SelectStageConfig.export.sparse (--export-sparse) needs export.lerobot (--export-lerobot)")


def run(store: Store, config: SelectStageConfig) -> Manifest:
    """Select from ``scores/<config.scores>``; commit ``selections/<config.run>`` (and its LeRobot / HDF5 exports)."""
    return select(store, config.scores, config.run, config.selection, export_lerobot=config.export.lerobot,
                  dense=not config.export.sparse, alpha=config.export.alpha, export_hdf5_mask=config.export.hdf5_mask)


def select(store: Store, scores_run: str, out_run: str, config: SelectConfig | None = None,
           export_lerobot: bool = False, dense: bool = True, alpha: float | None = None,
           export_hdf5_mask: str | None = None) -> Manifest:
    """:func:`run` with its options as arguments (the demo's, the sweep's and the tests' calls)."""
    config = config or SelectConfig()
    in_key, out_key = scores_key(scores_run), selection_key(out_run)
    inputs = {in_key: store.input_fingerprint(in_key)}

    def make() -> tuple[pa.Table, dict]:
        scores = store.read_table(in_key, columns=["source", "episode", "step", "score"])
        table = select_steps(scores, config)
        score_manifest = store.manifest(in_key)
        target = score_target(score_manifest)
        return table, {"scores": scores_run, "method": score_manifest.metadata.get("method"), "target": target,
                       "sources": sorted(set(scores.column("source").unique().to_pylist())),
                       **selection_metadata(store, table, scores.num_rows, target)}

    manifest = commit_table(store, out_key, "select", dict(config.__dict__), inputs, make, quiet=True).manifest
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

    ``sources`` default to every source that was scored (recorded by :func:`run`). When
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
    return commit_table(store, out_key, "export", config, inputs,
                        lambda: _lerobot_table(store, sel_key, selection, sel_sources, sources, alpha), quiet=True).manifest


def _lerobot_table(store: Store, sel_key: str, selection: pa.Table, sel_sources: list[str], sources: list[str],
                   alpha: float | None) -> tuple[pa.Table, dict]:
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
    return table, {
        "index": "global frame index over the step tables of `sources` laid end to end, episodes in "
                 "increasing id, steps in order",
        "source_offsets": {s: int(offsets[s][0]) for s in sources},
        "total_frames": total,
        **({"alpha": alpha} if alpha is not None else {}),
    }


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
    return commit_table(store, out_key, "export", config, inputs,
                        lambda: _lerobot_native_table(selection, metas, sources, dense, alpha), quiet=True).manifest


def _lerobot_native_table(selection: pa.Table, metas: dict[str, dict], sources: list[str], dense: bool,
                          alpha: float) -> tuple[pa.Table, dict]:
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
    return table, {
        "index": "the LeRobot dataset's own `index` column (dataset_from_index of the episode + frame_index)",
        "dense": bool(dense),
        "fallback_weight": 0.0,  # the weight of every frame the export does not list (sparse) or lists with 0
        "alpha": alpha,
        "alpha_meaning": "target share of each co-training batch (TrainConfig.alpha); the rest is drawn from the "
                         "prior frames by these weights",
        "datasets": {s: metas[s].get("root") for s in sources},
        "total_frames": {s: int(_episode_table(metas[s], s)[2].sum()) for s in sources},
        "selected_frames": int(selection.num_rows),
    }


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
