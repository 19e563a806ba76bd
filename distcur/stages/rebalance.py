"""The rebalance stage: steps -> groups -> group weights -> a weights table (a selection).

:func:`run` reads the step tables of the chosen sources, forms groups (task or source
labels, or k-means on embeddings / standardised state-action pairs), computes group weights
alpha with one method (``frequency``, ``dro`` or ``metagrad``) and writes per-step weights
w_i = alpha_g N / n_g as a table with :data:`distcur.schema.SELECTION_SCHEMA` at
``selections/<run>``, which the trainer consumes like any other selection. The manifest records
the groups, their sizes, alpha, the chosen k and its silhouette scores, and the method's
trajectory; a rerun with the same config and inputs is skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import torch

from distcur.config import to_dict
from distcur.data import embeddings_key, is_target_source, list_sources, load_steps, selection_key, steps_key
from distcur.policy.functional import Normalizer, PolicySpec
from distcur.rebalance.dro import DROConfig, dro_rebalance
from distcur.rebalance.frequency import frequency_alpha
from distcur.rebalance.group import (
    GroupAssignment,
    alpha_to_sample_weights,
    groups_from_labels,
    kmeans_groups,
)
from distcur.rebalance.metagrad import MetaGradConfig, metagrad_rebalance
from distcur.schema import SELECTION_SCHEMA, list_column_to_numpy
from distcur.stages.output import commit_table
from distcur.stages.train import source_action_standardizer
from distcur.store import Manifest, Store

log = logging.getLogger(__name__)

STAGE = "rebalance"
METHODS = ("frequency", "dro", "metagrad")
GROUPINGS = ("task", "source", "kmeans")


@dataclass
class RebalanceConfig:
    """Settings of one rebalance run (YAML keys are these field names; dro/metagrad nest)."""

    method: str = field(default="frequency", metadata={"choices": METHODS, "help": "group weighting"})
    groups: str = field(default="task", metadata={
        "choices": GROUPINGS, "help": "groups from task or source labels, or discovered by k-means"})
    sources: list[str] | None = field(default=None, metadata={  # default: every source but held-out target demos
        "help": "step sources to rebalance (default: all but held-out target demos)"})
    k: int | None = field(default=None, metadata={"help": "k-means: number of groups (default: best silhouette)"})
    k_range: tuple[int, int] = (2, 8)
    embeddings: str | None = field(default=None, metadata={  # None: k-means on state-action pairs
        "help": "k-means on embeddings/<ENCODER> instead of state-action"})
    hidden: tuple[int, ...] = (256, 256)  # policy of the DRO proxy/reference and the meta-gradient runs
    seed: int = 0
    dro: DROConfig = field(default_factory=DROConfig)
    metagrad: MetaGradConfig = field(default_factory=MetaGradConfig)
    # metagrad: names of the groups (tasks / sources) whose validation loss is the objective,
    # e.g. the curated ones when others may hold bad demos; None: every group.
    trusted: list[str] | None = field(default=None, metadata={
        "help": "metagrad: groups whose validation loss is the objective (default: all groups)"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"RebalanceConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.groups not in GROUPINGS:
            raise ValueError(f"RebalanceConfig.groups must be one of {GROUPINGS}, got {self.groups!r}")
        if self.k is not None and self.k < 2:
            raise ValueError(f"RebalanceConfig.k must be >= 2 (or None to choose it), got {self.k}")
        if self.groups != "kmeans" and (self.k is not None or self.embeddings is not None):
            raise ValueError(f"RebalanceConfig: k and embeddings apply to groups=kmeans only, got groups={self.groups!r}")
        if self.trusted is not None and (self.method != "metagrad" or self.groups == "kmeans" or not self.trusted):
            raise ValueError("RebalanceConfig.trusted: a non-empty list of group names, for method=metagrad with "
                             f"task or source groups; got trusted={self.trusted}, method={self.method!r}, "
                             f"groups={self.groups!r}")
        self.k_range = tuple(int(v) for v in self.k_range)
        self.hidden = tuple(int(h) for h in self.hidden)

    def method_config(self) -> dict:
        """The parts of the config the output depends on (another method's settings do not count)."""
        d = to_dict(self)
        for m in ("dro", "metagrad"):
            if m != self.method:
                d.pop(m)
        if self.method == "frequency":
            d.pop("hidden")
            if self.groups != "kmeans":
                d.pop("seed")
        return d


def _embedding_features(store: Store, encoder: str, sources: list[str], keys: pa.Table) -> np.ndarray:
    """Embeddings z (N, dz) aligned with the rows of ``keys`` (source, episode, step)."""
    parts = []
    for s in sources:
        key = embeddings_key(encoder, s)
        if store.manifest(key) is None:
            raise FileNotFoundError(f"no embeddings for source {s!r} at {store.uri_of(key)}; run `distcur embed` first")
        parts.append(store.read_table(key, columns=["source", "episode", "step", "z"]))
    emb = pa.concat_tables(parts)
    z = list_column_to_numpy(emb.column("z"), "z")
    lookup = {
        (s, int(e), int(t)): i
        for i, (s, e, t) in enumerate(zip(emb.column("source").to_pylist(), emb.column("episode").to_numpy(),
                                          emb.column("step").to_numpy()))
    }
    rows = []
    for s, e, t in zip(keys["source"], keys["episode"], keys["step"]):
        i = lookup.get((s, int(e), int(t)))
        if i is None:
            raise ValueError(f"embeddings/{encoder}: no embedding for source={s!r}, episode={e}, step={t}")
        rows.append(i)
    return z[np.asarray(rows)]


def make_groups(store: Store, cfg: RebalanceConfig, steps, sources: list[str]) -> GroupAssignment:
    if cfg.groups == "task":
        if (steps.task == "").any():
            i = int(np.argmax(steps.task == ""))
            raise ValueError(
                f"groups=task but source={steps.source[i]!r}, episode={steps.episode[i]} has no task label; "
                "use --groups source or kmeans"
            )
        return groups_from_labels(steps.task)
    if cfg.groups == "source":
        return groups_from_labels(steps.source)
    if cfg.embeddings:
        keys = {"source": steps.source.tolist(), "episode": steps.episode, "step": steps.step}
        features = _embedding_features(store, cfg.embeddings, sources, keys)
    else:
        features = np.concatenate([steps.state, steps.action], 1)
    return kmeans_groups(features, k=cfg.k, k_range=cfg.k_range, seed=cfg.seed)


def compute_alpha(cfg: RebalanceConfig, steps, groups: GroupAssignment) -> tuple[np.ndarray, dict]:
    """Group weights (G,) and the method's diagnostics for the manifest."""
    G = groups.k
    if cfg.method == "frequency":
        return frequency_alpha(groups.group, G), {}
    bounds = (-1.0, 1.0) if np.abs(steps.action).max() <= 1.0 else None
    norm = Normalizer.fit(steps.state, steps.action, action_bounds=bounds)
    obs, act = norm.state(steps.state), norm.action(steps.action)
    spec = PolicySpec(obs.shape[1], act.shape[1], cfg.hidden)
    if cfg.method == "dro":
        res = dro_rebalance(obs, act, groups.group, G, spec, cfg.dro, seed=cfg.seed)
        every = max(1, len(res.history) // 20)
        return res.alpha, {
            "alpha_trajectory": res.history[::every].round(6).tolist(),
            "mean_excess": res.excess.mean(0).round(6).tolist(),
            "reference_loss": np.round(res.reference_loss, 6).tolist(),
        }
    mg = cfg.metagrad
    if cfg.trusted:
        unknown = [t for t in cfg.trusted if t not in groups.names]
        if unknown:
            raise ValueError(f"rebalance: trusted group(s) {unknown} are not among the groups {groups.names}")
        mg = replace(mg, objective_groups=tuple(groups.names.index(t) for t in cfg.trusted))
    res = metagrad_rebalance(obs, act, groups.group, G, spec, mg, seed=cfg.seed, episode=steps.episode_ids())
    return res.alpha, {
        "alpha_trajectory": res.history.round(6).tolist(),
        "balanced_val_loss": np.round(res.objective, 6).tolist(),
        "val_loss_per_group": res.val_loss.round(6).tolist() if res.val_loss is not None else None,
    }


def run(store: Store | str, config: RebalanceConfig | None = None, run_name: str = "rebalance",
        force: bool = False) -> Manifest:
    """Compute group weights and write the weights table at ``selections/<run_name>``.

    Returns the committed manifest (the existing one when the same config and inputs were already
    done and ``force`` is False).
    """
    store = store if isinstance(store, Store) else Store(store)
    cfg = config or RebalanceConfig()
    # held-out target demos (target-<task>-heldout, from `ingest metaworld`) define the proxy: never trained on
    sources = list(cfg.sources) if cfg.sources else [s for s in list_sources(store)
                                                     if not (is_target_source(s) and s.endswith("-heldout"))]
    if not sources:
        raise FileNotFoundError(f"no step tables under {store.uri_of('steps')}")
    inputs = {steps_key(s): store.input_fingerprint(steps_key(s)) for s in sources}
    if cfg.groups == "kmeans" and cfg.embeddings:
        for s in sources:
            key = embeddings_key(cfg.embeddings, s)
            inputs[key] = store.input_fingerprint(key)
    key = selection_key(run_name)
    stage_config = cfg.method_config()

    def make() -> tuple[pa.Table, dict]:
        t0 = time.time()
        steps = load_steps(store, sources)
        # sources with different action spaces: each standardised by its own statistics (distcur.policy.actions)
        standardizer = source_action_standardizer(store, sources, sources[0])
        if standardizer is not None:
            steps.action = standardizer.apply(steps.action, steps.source)
        groups = make_groups(store, cfg, steps, sources)
        counts = groups.counts()
        torch.manual_seed(cfg.seed)
        alpha, diagnostics = compute_alpha(cfg, steps, groups)
        weights = alpha_to_sample_weights(groups.group, alpha, counts)
        table = pa.Table.from_arrays(
            [pa.array(steps.source.astype(str).tolist(), pa.string()), pa.array(steps.episode, pa.int64()),
             pa.array(steps.step, pa.int32()), pa.array(weights, pa.float32())],
            schema=SELECTION_SCHEMA,
        )
        metadata = {
            "method": cfg.method,
            "grouping": cfg.groups,
            "groups": groups.names,
            "group_counts": counts.tolist(),
            "alpha": np.round(alpha, 8).tolist(),
            "k": groups.k,
            "silhouette": {str(k): v for k, v in groups.silhouette.items()},
            "compute_s": round(time.time() - t0, 3),
            **diagnostics,
        }
        log.info("rebalance %s (%s, %s): k=%d, alpha=%s", run_name, cfg.method, cfg.groups, groups.k,
                 metadata["alpha"])
        return table, metadata

    out = commit_table(store, key, STAGE, stage_config, inputs, make, force=force, quiet=True)
    if out.skipped:
        log.info("rebalance %s: already done with the same config and inputs, skipping", run_name)
    return out.manifest
