"""The datamodel stage: DataMIL scores of the prior's clusters for a target task (``distcur datamodel``).

Estimators (docs/methods.md):

* ``regression``: m random cluster subsets, one small policy per subset (trained k at a time,
  batches spread over Ray tasks or one TorchTrainer's workers, resumable per batch), tau by
  regularised least squares,
  checked by the LDS on held-out subsets and by the split-half agreement of tau;
* ``metagrad``: exact meta-gradients of the proxy with respect to the clusters' loss weights,
  by distcur's recipe (independent iterations) or the public reference code's
  (``metagrad.recipe: datamil``: a training pool updated between iterations, which then run in
  sequence, or in rounds of ``metagrad.round_size``; see :mod:`distcur.datamodels.metagrad`).

Executors (``executor``; the same numbers either way, so it is not part of the manifests'
config): ``ray-tasks`` (default) trains the subset-model batches as Ray tasks and runs the
meta-gradient iterations on the driver; ``ray-train`` runs both on one TorchTrainer per stage
(``ray_train``: workers, CPUs and GPUs per worker, restarts), the meta-gradient iterations
committed one by one under ``datamodels/<run>/metagrad/``. The executors
(:class:`~distcur.distributed.tasks.RayTasks`, :class:`~distcur.distributed.raytrain.RayTrain`)
run the items this module hands them; the work itself (train one batch of stacked subset models,
run one meta-gradient iteration, commit it) is here, on the maths of :mod:`distcur.datamodels`.

Batches: the m subset models are cut into batches of ``models_per_batch``; batch i commits its
proxy losses as its own immutable table ``datamodels/<run>/results/batch=<i>`` with the batch's
config (model ids, mask fingerprint, training settings). That manifest is its done bit (the
completed-bitmap is read from the manifests, never from a shared mutable file, so parallel
workers cannot race on it); a rerun trains only the missing batches, a killed worker loses only
its unfinished batch, and the results are merged at the end.

Meta-gradient iterations (``ray-train``): iteration i of fold f commits (cluster, score) per
cluster as ``datamodels/<run>/metagrad/fold=<f>/iter=<i>`` with its config (run config, candidate
set, training pool, a fingerprint of the arrays). The ``distcur`` recipe's iterations are
independent: one round, spread over the workers. The ``datamil`` recipe's training pool depends
on the earlier iterations' scores, so they run in rounds of ``round_size``: a round's iterations
train on the pool the earlier rounds left, and after the round (a barrier) every worker reads
the round's scores and applies their pool moves in iteration order
(:func:`~distcur.datamodels.metagrad.round_pools`); the serial driver loop with the same
``round_size`` gives the same numbers.

Target injection (``inject_target``): the paper mixes half the target demos into the estimation
runs only for its real-robot priors; on simulated priors (MetaWorld, LIBERO) the estimation
trains on prior data alone. ``auto`` follows that: no injection when every prior source is a
simulated MetaWorld source (named ``metaworld`` or ingested by ``ingest-metaworld``), half the
target demos otherwise. Without injection the proxy is the loss on all target demos.

Outputs: ``scores/<run>`` (SCORE_SCHEMA, one row per prior step carrying its cluster's score,
higher = more useful), ``datamodels/<run>/tau`` (per cluster), and for the regression
``datamodels/<run>/masks`` and ``datamodels/<run>/results`` (merged; per-batch parts under
``results/batch=<i>``, or ``fold=<f>/results/batch=<i>`` with ``cross_fit``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from distcur.clusters import CLUSTER_LEVELS, DEFAULT_HORIZON, cluster_ids
from distcur.config import ConfigError, load_config, merge_options, read_yaml, to_dict
from distcur.data import (
    datamodel_key,
    default_prior_sources,
    load_steps,
    scores_key,
    steps_key,
    target_source,
)
from distcur.datamodels.metagrad import (
    RECIPES,
    MetagradFold,
    MetagradRunConfig,
    candidate_sets,
    combine_distcur,
    combine_reference,
    data_fingerprint,
    datamil_metagrad_scores,
    datamil_reference_scores,
    metagrad_iteration,
    round_pools,
)
from distcur.datamodels.proxy import split_target
from distcur.datamodels.regression import (
    PENALTIES,
    fit_linear_datamodel,
    linear_datamodeling_score,
    tau_reliability,
)
from distcur.datamodels.subsets import (
    SubsetTrainingData,
    SubsetTrainSettings,
    masks_table,
    plan_batches,
    subset_masks,
    train_batch,
)
from distcur.distributed.raytrain import (
    EXECUTORS,
    ClusterTooSmall,
    RayTrain,
    RayTrainSettings,
    WorkPlan,
    check_executor,
)
from distcur.distributed.tasks import RayTasks, failures
from distcur.policy.functional import AdamConfig, Normalizer, PolicySpec
from distcur.policy.proxy import PROXIES, check_proxy, make_proxy_fn
from distcur.progress import bar
from distcur.schema import SCORE_SCHEMA
from distcur.sources.metaworld import PRIOR_SOURCE as METAWORLD_SOURCE
from distcur.sources.metaworld import STAGE as METAWORLD_STAGE
from distcur.stages.output import commit_table
from distcur.stages.train import source_action_standardizer
from distcur.store import Manifest, Store

log = logging.getLogger(__name__)

ESTIMATORS = ("regression", "metagrad")
METHOD_NAMES = {"regression": "datamodel-regression", "metagrad": "datamodel-metagrad"}


@dataclass
class RegressionSettings:
    # Subsets that fit tau. On the demo prior (184 episode clusters) 128 models gave an LDS of 0.63
    # yet tau that two disjoint halves of the models did not agree on (split-half Spearman 0.02, top-10%
    # overlap at chance); with 1024 the halves of 512 agree at 0.46-0.62 on the three development
    # targets (see tau_reliability).
    num_models: int = 1024
    heldout_models: int = 64  # fresh subsets for the LDS
    keep_prob: float = 0.5
    steps: int = 300
    models_per_batch: int = 64  # trained at once in one Ray task
    penalty: str = "auto"  # lasso | ridge | auto (the lower CV error)
    cv_folds: int = 5
    common_random_numbers: bool = True  # same init and minibatch rows for every model: less noise in y
    # Also train the held-out subsets without common random numbers (own init seed and minibatch
    # rows per model) and report their LDS as lds_independent_seeds: the CRN LDS shares the training
    # noise between the fit and the check, this one measures prediction for a freshly trained policy.
    lds_independent_seeds: bool = field(default=True, metadata={
        "help": "also train the held-out subsets with independent seeds for a second LDS (default on)"})

    def __post_init__(self):
        if self.num_models < 4 or self.heldout_models < 3:
            raise ValueError(f"regression needs num_models >= 4 and heldout_models >= 3, got {self}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"regression.penalty must be one of {PENALTIES}, got {self.penalty!r}")


@dataclass
class MetagradSettings:
    # distcur: K differentiated steps with the candidates in every batch, independent iterations;
    # datamil: the public reference's recipe, one special batch at step T - K (METAGRAD_PRESETS).
    recipe: str = field(default="distcur", metadata={
        "choices": RECIPES, "help": "meta-gradient recipe: distcur (default) or datamil (the reference code's "
                                    "training pool and special batch)"})
    total_steps: int = 500  # T
    meta_steps: int = 50  # K
    iterations: int = 32  # each cluster scored 16 times at candidate_fraction 0.5
    candidate_fraction: float = 0.5
    checkpoint_every: int | None = None  # None: ceil(sqrt(K))
    lr: float | None = None  # peak learning rate; None: DatamodelConfig.lr
    lr_schedule: str = "constant"  # constant | linear | cosine decay over the T steps
    warmup_steps: int = 0
    batch_size: int | None = None  # None: DatamodelConfig.batch_size
    pool_percentiles: tuple[float, float] = (20.0, 80.0)  # datamil recipe: join / leave the training pool
    chunk_rows: int | None = None  # datamil recipe: the special batch computed this many rows at a time
    # datamil recipe: the pool moves once per round of this many iterations, which the ray-train
    # executor runs in parallel (1: the reference's sequence; the distcur recipe has no pool)
    round_size: int = 1

    def __post_init__(self):
        self.run_config(self.iterations, 1, 0.0, 0)  # validates
        if self.round_size < 1:
            raise ValueError(f"metagrad.round_size must be >= 1, got {self.round_size}")

    def run_config(self, iterations: int, batch_size: int, target_fraction: float,
                   seed: int) -> MetagradRunConfig:
        return MetagradRunConfig(
            self.total_steps, self.meta_steps, iterations, self.candidate_fraction,
            self.batch_size or batch_size, target_fraction, self.checkpoint_every, seed, self.recipe,
            self.lr_schedule, self.warmup_steps, tuple(self.pool_percentiles), self.chunk_rows,
        )


@dataclass
class DatamodelConfig:
    estimator: str = field(default="regression", metadata={"choices": ESTIMATORS})
    prior_sources: tuple[str, ...] | None = field(default=None, metadata={
        "help": "prior step sources (default: every ingested source but the target-* ones)"})
    cluster: str = field(default="episode", metadata={"choices": CLUSTER_LEVELS})
    horizon: int = field(default=DEFAULT_HORIZON, metadata={"help": "steps per sub-trajectory cluster"})
    # The subset model: small, so that many train at once; 128 wide, because at 64 the batched GEMMs
    # are too small to run efficiently (gemm_fraction 0.44 vs 0.60 measured in one run, under load).
    hidden: tuple[int, ...] = (128, 128)
    lr: float = 1e-3
    batch_size: int = 256
    # auto: inject half the target demos unless every prior source is simulated MetaWorld (module
    # docstring); true / false force it. The resolved value is in the manifests' metadata.
    inject_target: bool | str = field(default="auto", metadata={
        "choices": ("auto", "true", "false"),
        "help": "mix half the target demos into the estimation runs (auto, default: not for simulated MetaWorld "
                "priors, as the paper; the proxy then uses all target demos)"})
    target_fraction: float = 0.25  # share of each batch drawn from the injected target half, if injecting
    # mse: the tanh-Gaussian NLL is lowered by data that widens the predicted std, and with 1024
    # models its datamodel picked 15 failed rollouts of 19 on pick-place-wall (success 0.19 vs 0.61).
    proxy: str = field(default="mse", metadata={  # mse | nll (distcur.policy.proxy)
        "choices": PROXIES, "help": "proxy loss on the held-out target half: mse (the executed action's error, "
                                    "default) or nll (BC loss)"})
    # Cross-fitting: half the models (meta-gradient iterations) inject target half A and score on
    # half B, the other half swap, so the proxy covers every target demo at the same compute. Off by
    # default: on pick-place-wall it did not help (success 0.30 vs 0.61 without, 3 seeds x 50 episodes).
    cross_fit: bool = field(default=False, metadata={
        "help": "also score with the target halves swapped (half the models each) and fit one tau"})
    seed: int = 0
    regression: RegressionSettings = field(default_factory=RegressionSettings)
    metagrad: MetagradSettings = field(default_factory=MetagradSettings)
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS or a local Ray)"})
    max_retries: int = 1  # ray-tasks: retries of a batch's task
    executor: str = field(default="ray-tasks", metadata={  # module docstring
        "choices": EXECUTORS, "help": "ray-tasks (default): subset-model batches as Ray tasks, meta-gradient "
                                      "iterations on the driver; ray-train: both on one TorchTrainer "
                                      "(--workers, --gpus-per-worker)"})
    ray_train: RayTrainSettings = field(default_factory=RayTrainSettings)

    def __post_init__(self):
        check_executor(self.executor)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.cluster not in CLUSTER_LEVELS:
            raise ValueError(f"cluster must be one of {CLUSTER_LEVELS}, got {self.cluster!r}")
        if not 0 <= self.target_fraction < 1:
            raise ValueError(f"target_fraction must be in [0, 1), got {self.target_fraction}")
        # the command line's "true" / "false" (YAML gives booleans)
        self.inject_target = {"true": True, "false": False}.get(self.inject_target, self.inject_target) \
            if isinstance(self.inject_target, str) else self.inject_target
        if self.inject_target not in (True, False, "auto"):
            raise ValueError(f"inject_target must be true, false or 'auto', got {self.inject_target!r}")
        if self.cross_fit and self.inject_target is False:
            raise ValueError("cross_fit swaps the injected and proxy target halves: it needs inject_target")
        check_proxy(self.proxy)


# Paper size (DataMIL's MetaWorld settings): 3 x 400 policy, K = 100 of T = 1100, 50 iterations.
FULL_PRESET: dict[str, Any] = {
    "hidden": (400, 400, 400),
    "regression": {"num_models": 1024, "heldout_models": 64, "steps": 1100, "models_per_batch": 32},
    "metagrad": {"total_steps": 1100, "meta_steps": 100, "iterations": 50},
}

# The reference meta-gradient recipe (UT-Austin-RobIn/datamil, scripts/configs/dm_metaworld_config.py
# and the optimiser it builds): 1100 steps of batch 16364, the special batch at step 1000, 50
# iterations, peak lr 5e-3 with warmup 44 and a linear decay, 3 x 400 policy; the special batch (half
# the prior, ~10^6 rows) in chunks of a batch, as the reference streams it. ``datamil`` is the
# same recipe at a size for 2 cores (the demo's 128 x 128 policy, batch 256).
METAGRAD_PRESETS: dict[str, dict[str, Any]] = {
    "datamil-paper": {
        "hidden": (400, 400, 400),
        "metagrad": {"recipe": "datamil", "total_steps": 1100, "meta_steps": 100, "iterations": 50,
                     "lr": 5e-3, "lr_schedule": "linear", "warmup_steps": 44, "batch_size": 16364,
                     "chunk_rows": 16364},
    },
    "datamil": {
        "metagrad": {"recipe": "datamil", "total_steps": 500, "meta_steps": 50, "iterations": 32, "lr": 5e-3,
                     "lr_schedule": "linear", "warmup_steps": 20},
    },
}


def preset_options(full: bool = False, metagrad_preset: str | None = None) -> dict:
    """The options of the presets: ``FULL_PRESET`` if ``full``, then ``METAGRAD_PRESETS[metagrad_preset]``."""
    data: dict = {}
    if full:
        data = merge_options(data, FULL_PRESET)
    if metagrad_preset is not None:
        if metagrad_preset not in METAGRAD_PRESETS:
            raise ValueError(f"metagrad_preset must be one of {sorted(METAGRAD_PRESETS)}, "
                             f"got {metagrad_preset!r}")
        data = merge_options(data, METAGRAD_PRESETS[metagrad_preset])
    return data


def make_config(source: str | dict | None = None, full: bool = False, metagrad_preset: str | None = None,
                **overrides: Any) -> DatamodelConfig:
    """Defaults (demo size), then ``FULL_PRESET`` if ``full``, then ``METAGRAD_PRESETS[metagrad_preset]``,
    then the YAML/dict, then overrides."""
    try:
        return load_config(DatamodelConfig, merge_options(preset_options(full, metagrad_preset), read_options(source)),
                           **overrides)
    except ConfigError as e:
        if isinstance(source, str | os.PathLike):
            raise ConfigError(f"{source}: {e}") from None
        raise


def read_options(source: str | dict | None) -> dict:
    """A config source as a dict: itself, the YAML file it names, or empty."""
    if isinstance(source, dict) or source is None:
        return dict(source or {})
    return read_yaml(source) or {}


def resolve_inject_target(store: Store, cfg: DatamodelConfig) -> bool:
    """``cfg.inject_target`` with ``auto`` resolved: false when every prior source is simulated
    MetaWorld (its name, or the stage that ingested its step table), true otherwise."""
    if cfg.inject_target != "auto":
        return bool(cfg.inject_target)

    def simulated(source: str) -> bool:
        m = store.manifest(steps_key(source))
        return source == METAWORLD_SOURCE or (m is not None and m.stage == METAWORLD_STAGE)

    return not all(simulated(s) for s in default_prior_sources(store, cfg.prior_sources))


def _prepare(store: Store, cfg: DatamodelConfig, target_task: str, inject: bool):
    """(prior, clusters, one SubsetTrainingData per fold, spec). With ``inject`` fold 0 injects the
    first target half and scores on the second, and with ``cross_fit`` fold 1 swaps them; without,
    one fold trains on the prior alone and scores on every target demo."""
    cfg = dataclasses.replace(cfg, prior_sources=tuple(default_prior_sources(store, cfg.prior_sources)))
    if cfg.cross_fit and not inject:
        raise ValueError(f"cross_fit needs target injection, but inject_target={cfg.inject_target!r} "
                         f"resolved to false for the simulated prior {list(cfg.prior_sources)}; "
                         "set inject_target: true")
    prior = load_steps(store, list(cfg.prior_sources))
    target = load_steps(store, [target_source(target_task)])
    if prior.state.shape[1] != target.state.shape[1] or prior.action.shape[1] != target.action.shape[1]:
        raise ValueError(
            f"prior {list(cfg.prior_sources)} has state/action dims {prior.state.shape[1]}/{prior.action.shape[1]} "
            f"but target {target_source(target_task)} has {target.state.shape[1]}/{target.action.shape[1]}"
        )
    clusters = cluster_ids(prior, cfg.cluster, cfg.horizon)
    # sources with different action spaces: each standardised by its own statistics (distcur.policy.actions)
    std = source_action_standardizer(store, [*cfg.prior_sources, target_source(target_task)], target_source(target_task))
    if std is not None:
        prior.action, target.action = std.apply(prior.action, prior.source), std.apply(target.action, target.source)
    all_act = np.concatenate([prior.action, target.action])
    bounds = (-1.0, 1.0) if std is None and np.abs(all_act).max() <= 1.0 else None
    norm = Normalizer.fit(np.concatenate([prior.state, target.state]), all_act, bounds)
    if inject:
        split = split_target(target, cfg.seed)
        halves = [(split.inject, split.proxy)] + ([(split.proxy, split.inject)] if cfg.cross_fit else [])
    else:
        halves = [(target.take(np.arange(0)), target)]
    folds = [
        SubsetTrainingData(
            obs=norm.state(np.concatenate([prior.state, inject.state])),
            act=norm.action(np.concatenate([prior.action, inject.action])),
            group=np.concatenate([clusters.ids, np.full(len(inject), -1, np.int64)]),
            n_clusters=clusters.n_clusters,
            proxy_obs=norm.state(proxy.state),
            proxy_act=norm.action(proxy.action),
        )
        for inject, proxy in halves
    ]
    spec = PolicySpec(prior.state.shape[1], prior.action.shape[1], tuple(cfg.hidden))
    return prior, clusters, folds, spec


# -- subset-model batches ---------------------------------------------------------------------

RESULT_SCHEMA = pa.schema([pa.field("model", pa.int64(), nullable=False), pa.field("proxy", pa.float64(), nullable=False)])
BATCH_STAGE = "datamodel-batch"


def results_prefix(run: str) -> str:
    return datamodel_key(run, "results")


def batch_key(run: str, batch: int) -> str:
    return f"{results_prefix(run)}/batch={batch:05d}"


def _masks_fingerprint(masks: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.asarray(masks, bool), axis=1).tobytes()).hexdigest()[:16]


def _batch_config(batch: int, models: np.ndarray, masks: np.ndarray, settings: SubsetTrainSettings) -> dict:
    return {"batch": batch, "models": [int(m) for m in models], "masks": _masks_fingerprint(masks),
            "train": settings.as_dict()}


def completed_bitmap(store: Store, run: str, models: np.ndarray, masks: np.ndarray, settings: SubsetTrainSettings,
                     models_per_batch: int, inputs: dict[str, str]) -> np.ndarray:
    """(n_batches,) bool: batch i's results are committed for exactly this batch config and inputs."""
    batches = plan_batches(np.asarray(models), models_per_batch)
    return np.array([
        store.is_done(batch_key(run, i), BATCH_STAGE,
                      _batch_config(i, b, masks[i * models_per_batch : i * models_per_batch + len(b)], settings), inputs)
        for i, b in enumerate(batches)
    ], bool)


def train_and_store_batch(store: Store, run: str, batch: int, models: np.ndarray, masks: np.ndarray,
                          data: SubsetTrainingData, settings: SubsetTrainSettings, inputs: dict[str, str],
                          fault_marker: str | None = None, device=None) -> int:
    """Train one batch of subset models and commit its results table; returns the rows written.

    ``fault_marker``: for fault-injection tests, a file listing batch indices; a task whose
    batch is listed exits its worker process abruptly (``os._exit``) before committing.
    ``device``: where the models train (None: the CPU, one torch thread)."""
    if device is None:
        torch.set_num_threads(1)
    if fault_marker and os.path.exists(fault_marker):
        with open(fault_marker) as f:
            if str(batch) in f.read().split():
                os._exit(1)
    proxy = train_batch(data, batch, models, masks, settings, device or "cpu")
    table = pa.Table.from_pydict({"model": np.asarray(models, np.int64), "proxy": proxy}, schema=RESULT_SCHEMA)
    commit_table(store, batch_key(run, batch), BATCH_STAGE, _batch_config(batch, models, masks, settings), inputs,
                 lambda: (table, None), force=True, quiet=True)
    return table.num_rows


class BatchesFailed(RuntimeError):
    """Some batches did not complete; the completed ones are committed, a rerun fills the rest."""


@dataclass(frozen=True)
class _Batches:
    """What every batch's work needs (the shared payload of an executor)."""

    store: Store
    run: str
    batches: list[np.ndarray]
    batch_masks: list[np.ndarray]
    data: SubsetTrainingData
    settings: SubsetTrainSettings
    inputs: dict[str, str]
    fault_marker: str | None = None  # ray-tasks: the listed batches' tasks always die

    def is_done(self, i: int) -> bool:
        return self.store.is_done(batch_key(self.run, i), BATCH_STAGE,
                                  _batch_config(i, self.batches[i], self.batch_masks[i], self.settings), self.inputs)

    def work(self, i: int, device=None, fault_marker: str | None = None) -> None:
        train_and_store_batch(self.store, self.run, i, self.batches[i], self.batch_masks[i], self.data, self.settings,
                              self.inputs, fault_marker, device)


def _batch_task(i: int, batches: _Batches) -> None:
    """A Ray task of the ``ray-tasks`` executor: batch ``i`` on the CPU."""
    batches.work(i, None, batches.fault_marker)


def _batches_plan(todo: list[int]):
    def make_plan(batches: _Batches, device) -> WorkPlan:
        return WorkPlan(rounds=[todo], is_done=batches.is_done, work=lambda i: batches.work(i, device))

    return make_plan


def run_subset_batches(store: Store, run: str, models: np.ndarray, masks: np.ndarray, data: SubsetTrainingData,
                       settings: SubsetTrainSettings, models_per_batch: int, inputs: dict[str, str],
                       executor: RayTasks | RayTrain | None = None,
                       fault_marker: str | None = None) -> tuple[pa.Table, dict]:
    """Train every model (the missing batches as Ray tasks, or spread over one TorchTrainer's
    workers with a :class:`~distcur.distributed.raytrain.RayTrain` executor) and merge the results.

    ``models`` (m,) ids and ``masks`` (m, C) bool. Returns the merged (model, proxy) table sorted
    by model and stats {"batches", "trained", "skipped"}. Raises :class:`BatchesFailed` naming the
    failed batches after every other batch has finished and committed (Ray tasks); with Ray Train
    the trainer's error after ``ray_train.max_failures`` restarts, the committed batches kept.
    """
    executor = executor or RayTasks(max_retries=1)
    batches = plan_batches(np.asarray(models), models_per_batch)
    batch_masks = [masks[i : i + models_per_batch] for i in range(0, len(models), models_per_batch)]
    done = completed_bitmap(store, run, models, masks, settings, models_per_batch, inputs)
    todo = [int(i) for i in np.flatnonzero(~done)]
    log.info("datamodel %s: %d of %d batches complete, training %d", run, int(done.sum()), len(batches), len(todo))
    if todo:
        # the bar opens before Ray starts and the training data goes to the object store (seconds
        # on a loaded machine), so a terminal never waits without output
        with bar(total=len(todo), desc=f"datamodel {run} batches", unit="batch") as progress:
            if isinstance(executor, RayTrain):
                shared = _Batches(store, run, batches, batch_masks, data, settings, inputs)
                seen = [0]

                def poll() -> None:
                    n = sum(store.manifest(batch_key(run, i)) is not None for i in todo)
                    if n > seen[0]:
                        progress.update(n - seen[0])
                        seen[0] = n

                error = "Ray Train finished without committing it"
                try:
                    executor.run(_batches_plan(todo), shared, store.uri_of(datamodel_key(run, "ray")),
                                 "datamodel-batches", poll, fault_marker)
                except ClusterTooSmall:  # nothing ran: the config's error, not a failed batch
                    raise
                except Exception as e:  # the trainer's error after its restarts: name what is missing
                    error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                missing = ~completed_bitmap(store, run, models, masks, settings, models_per_batch, inputs)
                failed = {int(i): error for i in np.flatnonzero(missing)}
            else:
                shared = _Batches(store, run, batches, batch_masks, data, settings, inputs, fault_marker)
                executor.start()
                shared_ref = executor.put(shared)  # once, not once per batch
                results = executor.each(_batch_task, [(i, shared_ref) for i in todo],
                                        on_result=lambda i, r: progress.update(), keep_going=True)
                failed = {todo[i]: e for i, e in failures(results).items()}
        if failed:
            raise BatchesFailed(
                f"datamodel {run}: {len(failed)} of {len(batches)} batches failed {sorted(failed)} "
                f"(first: {next(iter(failed.values()))}); the others are committed under "
                f"{store.uri_of(results_prefix(run))} - rerun to train only the missing ones"
            )
    parts = [store.read_table(batch_key(run, i)) for i in range(len(batches))]
    merged = pa.concat_tables(parts).sort_by("model")
    return merged, {"batches": len(batches), "trained": len(todo), "skipped": int(done.sum())}


# -- meta-gradient iterations on the ray-train executor ----------------------------------------

ITERATION_STAGE = "datamodel-metagrad-iteration"
ITERATION_SCHEMA = pa.schema([pa.field("cluster", pa.int64(), nullable=False),
                              pa.field("score", pa.float64(), nullable=False)])


def iteration_key(run: str, fold: int, it: int) -> str:
    return datamodel_key(run, f"metagrad/fold={fold}/iter={it:05d}")


class _FoldState:
    """What the store holds of one fold: the committed scores, walked round by round (a datamil
    round's pool is known only once every earlier round is committed)."""

    def __init__(self, store: Store, run: str, job: MetagradFold, inputs: dict[str, str], data_fp: str):
        self.store, self.run, self.job, self.inputs, self.data_fp = store, run, job, inputs, data_fp
        self.candidate_sets = candidate_sets(job.data.n_clusters, job.run_cfg)

    def pool(self, scores: list[np.ndarray], it: int) -> np.ndarray | None:
        if self.job.run_cfg.recipe == "distcur":
            return None
        return round_pools(scores, self.job.data.n_clusters, self.job.run_cfg, self.job.round_size)[0][it]

    def config(self, scores: list[np.ndarray], it: int) -> dict:
        return self.job.iteration_config(it, self.candidate_sets[it], self.pool(scores, it), self.data_fp)

    def is_done(self, scores: list[np.ndarray], it: int) -> bool:
        return self.store.is_done(iteration_key(self.run, self.job.fold, it), ITERATION_STAGE,
                                  self.config(scores, it), self.inputs)

    def read(self, it: int) -> np.ndarray:
        t = self.store.read_table(iteration_key(self.run, self.job.fold, it))
        out = np.zeros(self.job.data.n_clusters)
        out[t.column("cluster").to_numpy()] = t.column("score").to_numpy()
        return out

    def committed(self) -> tuple[list[np.ndarray], int]:
        """(the scores of every iteration before the first incomplete round, how many iterations
        are committed in all); for the distcur recipe the single round may be partly done."""
        scores: list[np.ndarray] = []
        done = 0
        for rnd in self.job.rounds():
            flags = [self.is_done(scores, it) for it in rnd]
            done += sum(flags)
            if not all(flags):
                break
            scores += [self.read(it) for it in rnd]
        return scores, done


@dataclass(frozen=True)
class _Folds:
    """The shared payload of the meta-gradient plan: every fold's job and data fingerprint."""

    store: Store
    run: str
    jobs: list[MetagradFold]
    data_fps: list[str]
    inputs: dict[str, str]


def _metagrad_plan(folds: _Folds, device) -> WorkPlan:
    """Inside a worker: every fold's rounds in order, items (fold, iteration); each iteration
    computed on the CPU (``cpus_per_worker`` threads) and committed. The fault marker applies to
    fold 0's iterations."""
    states = [_FoldState(folds.store, folds.run, job, folds.inputs, fp) for job, fp in zip(folds.jobs, folds.data_fps)]
    scores: list[list[np.ndarray]] = [[] for _ in folds.jobs]  # each fold's committed rounds, in iteration order
    tensors = {}

    def arrays(f: int):
        if f not in tensors:
            job, d = folds.jobs[f], folds.jobs[f].data
            tensors[f] = (torch.as_tensor(d.obs), torch.as_tensor(d.act),
                          make_proxy_fn(job.spec, torch.as_tensor(d.proxy_obs), torch.as_tensor(d.proxy_act), job.proxy))
        return tensors[f]

    def work(item: tuple[int, int]) -> None:
        f, it = item
        job, state = folds.jobs[f], states[f]
        obs, act, proxy_fn = arrays(f)
        candidates = state.candidate_sets[it]
        s = metagrad_iteration(job.spec, job.adam, obs, act, job.data.group, job.data.n_clusters, proxy_fn,
                               job.run_cfg, it, candidates, state.pool(scores[f], it))
        # the candidates' entries are the scores (the datamil recipe's are 0 elsewhere anyway)
        table = pa.Table.from_pydict({"cluster": np.flatnonzero(candidates).astype(np.int64), "score": s[candidates]},
                                     schema=ITERATION_SCHEMA)
        commit_table(folds.store, iteration_key(folds.run, job.fold, it), ITERATION_STAGE,
                     state.config(scores[f], it), folds.inputs, lambda: (table, None), force=True, quiet=True)

    def after_round(rnd) -> None:  # every worker has passed the round's last report: it is committed
        scores[rnd[0][0]].extend(states[f].read(it) for f, it in rnd)

    rounds = [[(f, it) for it in rnd] for f, job in enumerate(folds.jobs) for rnd in job.rounds()]
    return WorkPlan(rounds=rounds, is_done=lambda item: states[item[0]].is_done(scores[item[0]], item[1]), work=work,
                    after_round=after_round, key=lambda item: item[1] if folds.jobs[item[0]].fold == 0 else -1)


class MetagradFailed(RuntimeError):
    """Some iterations are not committed; the committed ones are kept, a rerun does the rest."""


def run_metagrad_iterations(store: Store, run: str, jobs: list[MetagradFold], inputs: dict[str, str],
                            executor: RayTrain | None = None, progress=None, fault_marker: str | None = None
                            ) -> list[tuple[np.ndarray, np.ndarray, list[int] | None]]:
    """Every fold's iterations under one TorchTrainer (skipped when all are committed); returns per
    fold (score (C,), count (C,), pool sizes per iteration or None for the distcur recipe), the
    numbers of :func:`~distcur.datamodels.metagrad.datamil_metagrad_scores` /
    :func:`~distcur.datamodels.metagrad.datamil_reference_scores` (with the same ``round_size``).

    ``progress``: a bar moved as iterations commit. ``fault_marker``: a file listing fold-0
    iterations at which a worker dies once (tests)."""
    executor = executor or RayTrain()
    fps = [data_fingerprint(j.data) for j in jobs]
    states = [_FoldState(store, run, j, inputs, fp) for j, fp in zip(jobs, fps)]
    total = sum(j.run_cfg.iterations for j in jobs)

    def committed() -> int:
        return sum(s.committed()[1] for s in states)

    done = committed()
    log.info("meta-gradient %s: %d of %d iterations committed", run, done, total)
    seen = [done]
    if progress is not None and done:
        progress.update(done)

    def poll() -> None:
        n = committed()
        if progress is not None and n > seen[0]:
            progress.update(n - seen[0])
            seen[0] = n

    if done < total:
        error = None
        try:
            executor.run(_metagrad_plan, _Folds(store, run, jobs, fps, inputs), store.uri_of(datamodel_key(run, "ray")),
                         "datamodel-metagrad", poll, fault_marker)
        except ClusterTooSmall:  # nothing ran: the config's error, not a failed iteration
            raise
        except Exception as e:  # the trainer's error after its restarts: say what is missing
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        missing = total - committed()
        if missing:
            raise MetagradFailed(f"meta-gradient {run}: {missing} of {total} iterations are not committed "
                                 f"({error or 'Ray Train finished without them'}); the others are under "
                                 f"{store.uri_of(datamodel_key(run, 'metagrad'))} - rerun to do only the missing ones")
    out = []
    for job, state in zip(jobs, states):
        scores, _ = state.committed()
        c = job.data.n_clusters
        if job.run_cfg.recipe == "distcur":
            out.append((*combine_distcur(scores, state.candidate_sets, c), None))
        else:
            out.append((*combine_reference(scores, c), round_pools(scores, c, job.run_cfg, job.round_size)[1]))
    return out


# -- the stage ---------------------------------------------------------------------------------


def _fold_run(run: str, fold: int, n_folds: int) -> str:
    """Where a fold's per-batch results live: ``run`` itself without cross-fitting."""
    return run if n_folds == 1 else f"{run}/fold={fold}"


def _standardise(y_raw: np.ndarray, fold_of: np.ndarray, fold_stats: list[dict]) -> np.ndarray:
    """Proxy losses (m,) in per-fold standard units (``fold_stats[f]``: proxy_mean, proxy_std); as
    given without folds."""
    if not fold_stats:
        return y_raw
    y = np.empty_like(y_raw)
    for f, st in enumerate(fold_stats):
        y[fold_of == f] = (y_raw[fold_of == f] - st["proxy_mean"]) / st["proxy_std"]
    return y


def _regression(store: Store, run: str, cfg: DatamodelConfig, folds: list[SubsetTrainingData], spec: PolicySpec,
                inputs: dict[str, str], target_fraction: float, executor: RayTasks | RayTrain,
                fault_marker: str | None = None) -> tuple[np.ndarray, dict]:
    r = cfg.regression
    m, h, c = r.num_models, r.heldout_models, folds[0].n_clusters
    models = np.arange(m + h)
    masks = subset_masks(models, c, r.keep_prob, cfg.seed)
    splits = ["train"] * m + ["heldout"] * h
    commit_table(store, datamodel_key(run, "masks"), "datamodel-masks",
                 {"n_clusters": c, "keep_prob": r.keep_prob, "seed": cfg.seed, "models": m + h}, inputs,
                 lambda: (masks_table(models, splits, masks), None), force=True, quiet=True)
    settings = SubsetTrainSettings(spec, AdamConfig(lr=cfg.lr), r.steps, cfg.batch_size, target_fraction,
                                   cfg.seed, shared_init=r.common_random_numbers, proxy=cfg.proxy)
    # Model j trains in fold j % n_folds: its masks stay those of the single-fold design.
    n_folds = len(folds)
    fold_of = models % n_folds
    parts, stats = [], {"batches": 0, "trained": 0, "skipped": 0}
    for f, data in enumerate(folds):
        sel = fold_of == f
        part, st = run_subset_batches(store, _fold_run(run, f, n_folds), models[sel], masks[sel], data, settings,
                                      r.models_per_batch, inputs, executor, fault_marker)
        parts.append(part.append_column("fold", pa.array(np.full(part.num_rows, f, np.int64))))
        stats = {k: stats[k] + st[k] for k in stats}
    results = pa.concat_tables(parts).sort_by("model")
    y_raw = results.column("proxy").to_numpy()
    # Each fold's proxy is a different held-out half, on its own scale: standardise y per fold
    # with its training models' mean and std, so one tau explains both (the fold means are the
    # per-fold biases).
    fold_stats = []
    if n_folds > 1:
        for f in range(n_folds):
            train = y_raw[(fold_of == f) & (models < m)]
            fold_stats.append({"proxy_mean": float(train.mean()), "proxy_std": float(train.std()) or 1.0})
    y = _standardise(y_raw, fold_of, fold_stats)
    commit_table(store, datamodel_key(run, "results"), "datamodel-results", settings.as_dict(), inputs,
                 lambda: (results, stats), force=True, quiet=True)
    fit = fit_linear_datamodel(masks[:m], y[:m], r.penalty, r.cv_folds, cfg.seed)
    lds = linear_datamodeling_score(fit, masks[m:], y[m:])
    lds_independent = lds if not r.common_random_numbers else None
    if r.lds_independent_seeds and r.common_random_numbers:
        # The same held-out masks, one model per task: its own init seed and minibatch rows.
        independent = dataclasses.replace(settings, shared_init=False)
        held = models >= m
        parts = []
        for f, data in enumerate(folds):
            sel = held & (fold_of == f)
            parts.append(run_subset_batches(store, f"{_fold_run(run, f, n_folds)}/independent", models[sel],
                                            masks[sel], data, independent, 1, inputs, executor, fault_marker)[0])
        y_ind_raw = pa.concat_tables(parts).sort_by("model").column("proxy").to_numpy()
        y_ind = _standardise(y_ind_raw, fold_of[held], fold_stats)
        lds_independent = linear_datamodeling_score(fit, masks[m:], y_ind)
    rel = tau_reliability(masks[:m], y[:m], 0.1, r.penalty, r.cv_folds, cfg.seed)
    meta = {"lds": lds, "lds_independent_seeds": lds_independent,
            "tau_split_half_spearman": rel["split_half_spearman"], "tau_top10_overlap": rel["top_overlap"],
            "penalty": fit.penalty, "alpha": fit.alpha, "cv_mse": fit.cv_mse,
            "cv_mse_by_penalty": fit.cv_mse_by_penalty, "bias": fit.bias, "proxy_mean": float(y_raw.mean()),
            "proxy_std": float(y_raw.std()), **({"folds": fold_stats} if fold_stats else {}), **stats}
    log.info("datamodel %s: LDS %.3f (independent seeds %s; %s, alpha %.3g); tau split-half Spearman %.2f, "
             "top-10%% overlap %.2f", run, lds, "-" if lds_independent is None else f"{lds_independent:.3f}",
             fit.penalty, fit.alpha, rel["split_half_spearman"], rel["top_overlap"])
    return fit.tau, meta


def _metagrad(store: Store, run: str, cfg: DatamodelConfig, folds: list[SubsetTrainingData], spec: PolicySpec,
              target_fraction: float, inputs: dict[str, str], executor: RayTasks | RayTrain,
              fault_marker: str | None = None) -> tuple[np.ndarray, dict]:
    mg = cfg.metagrad
    n_folds = len(folds)
    # The iterations are shared among the folds (the same compute as one fold); each fold's mean
    # meta-gradients are in its own proxy's units, so they are divided by their spread over the
    # clusters before averaging. The datamil recipe runs each fold's iterations in sequence (in
    # rounds of round_size) on its own training pool.
    iters = [max(1, mg.iterations // n_folds + (f < mg.iterations % n_folds)) for f in range(n_folds)]
    adam = AdamConfig(lr=mg.lr if mg.lr is not None else cfg.lr)
    # each iteration trains a policy for seconds: one bar over every fold's iterations
    run_cfgs = [mg.run_config(iters[f], cfg.batch_size, target_fraction, cfg.seed + 7919 * f) for f in range(n_folds)]
    with bar(total=sum(iters), desc=f"meta-gradient iterations ({mg.recipe})", unit="it") as iterations_bar:
        if isinstance(executor, RayTrain):
            jobs = [MetagradFold(f, data, spec, adam, run_cfgs[f], cfg.proxy, mg.round_size)
                    for f, data in enumerate(folds)]
            per_fold = run_metagrad_iterations(store, run, jobs, inputs, executor, iterations_bar, fault_marker)
        else:
            per_fold = []
            for data, run_cfg in zip(folds, run_cfgs):
                proxy_fn = make_proxy_fn(spec, torch.as_tensor(data.proxy_obs), torch.as_tensor(data.proxy_act),
                                         cfg.proxy)
                args = (spec, adam, torch.as_tensor(data.obs), torch.as_tensor(data.act),
                        torch.as_tensor(data.group), data.n_clusters, proxy_fn, run_cfg)
                if mg.recipe == "datamil":
                    per_fold.append(datamil_reference_scores(*args, on_iteration=iterations_bar.update,
                                                             round_size=mg.round_size))
                else:
                    per_fold.append((*datamil_metagrad_scores(*args, on_iteration=iterations_bar.update), None))
    scores, counts, pools = [], [], []
    for grads, count, pool_sizes in per_fold:
        if n_folds > 1:
            sd = float(grads[count > 0].std()) if (count > 0).any() else 0.0
            grads = grads / sd if sd > 0 else grads
        scores.append(grads)
        counts.append(count)
        if pool_sizes is not None:
            pools.append(pool_sizes)
    grads, count = np.mean(scores, axis=0), np.sum(counts, axis=0)
    meta = {"recipe": mg.recipe, "iterations": int(sum(iters)), "folds": n_folds,
            "min_count": int(count.min()), "max_count": int(count.max())}
    # datamil: count is the number of non-zero scores, pool_sizes the training pool after each iteration
    return grads, {**meta, **({"pool_sizes": pools} if pools else {})}


def make_executor(cfg: DatamodelConfig) -> RayTasks | RayTrain:
    """The executor ``cfg.executor`` names: Ray tasks (``max_retries``), or one TorchTrainer (``ray_train``)."""
    if cfg.executor == "ray-train":
        return RayTrain(cfg.ray_train, cfg.address)
    return RayTasks(cfg.address, max_retries=cfg.max_retries)


def run(store: Store | str, config: DatamodelConfig, target_task: str, run_name: str,
        executor: RayTasks | RayTrain | None = None, fault_marker: str | None = None) -> Manifest:
    """Score the prior's clusters for ``target_task``; returns the manifest of ``scores/<run_name>``.

    Skipped (the committed manifest returned) when ``scores/<run_name>`` was made from the same
    config and inputs. ``executor`` (default: the one ``config.executor`` names,
    :func:`make_executor`) runs the subset-model batches and, if it is a Ray Train one, the
    meta-gradient iterations; it is not part of what the stage computes."""
    store = store if isinstance(store, Store) else Store(store)
    cfg = dataclasses.replace(config, prior_sources=tuple(default_prior_sources(store, config.prior_sources)))
    executor = executor or make_executor(cfg)
    # where it runs is not what it computes: the executor and its scaling stay out of the config
    fingerprint = {k: v for k, v in to_dict(cfg).items() if k not in ("executor", "ray_train")}
    fingerprint = {**fingerprint, "target": target_task, "address": None}
    sources = [*cfg.prior_sources, target_source(target_task)]
    inputs = {steps_key(s): store.input_fingerprint(steps_key(s)) for s in sources}

    def make() -> tuple[pa.Table, dict]:
        t0 = time.time()
        torch.manual_seed(cfg.seed)
        inject = resolve_inject_target(store, cfg)
        target_fraction = cfg.target_fraction if inject else 0.0
        prior, clusters, folds, spec = _prepare(store, cfg, target_task, inject)
        if cfg.estimator == "regression":
            tau, meta = _regression(store, run_name, cfg, folds, spec, inputs, target_fraction, executor, fault_marker)
        else:
            tau, meta = _metagrad(store, run_name, cfg, folds, spec, target_fraction, inputs, executor, fault_marker)
        meta = {**meta, "executor": executor.kind, "inject_target": inject, "target_fraction": target_fraction,
                "proxy_demos": "all target demos" if not inject else "the held-out target half"}
        tau_table = pa.table({"cluster": np.arange(clusters.n_clusters, dtype=np.int64),
                              "key": clusters.keys.astype(str), "size": clusters.sizes(),
                              "tau": tau.astype(np.float64)})
        commit_table(store, datamodel_key(run_name, "tau"), "datamodel-tau", fingerprint, inputs,
                     lambda: (tau_table, meta), force=True, quiet=True)
        # tau / the meta-gradient is the change of the proxy *loss*: the score is its negative.
        score = -tau[clusters.ids]
        table = pa.Table.from_pydict(
            {"source": prior.source.astype(str), "episode": prior.episode, "step": prior.step,
             "score": score.astype(np.float64), "method": [METHOD_NAMES[cfg.estimator]] * len(prior)},
            schema=SCORE_SCHEMA,
        )
        return table, {**meta, "clusters": clusters.n_clusters, "cluster": cfg.cluster,
                       "compute_s": round(time.time() - t0, 2)}

    out = commit_table(store, scores_key(run_name), "datamodel", fingerprint, inputs, make, quiet=True)
    if out.skipped:
        log.info("datamodel %s: up to date, skipped", run_name)
    return out.manifest
