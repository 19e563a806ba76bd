"""``distcur datamodel``: DataMIL scores of the prior's clusters for a target task.

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
committed one by one under ``datamodels/<run>/metagrad/`` (:mod:`distcur.distributed.metagrad`).

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

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from distcur.clusters import CLUSTER_LEVELS, DEFAULT_HORIZON, cluster_ids
from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE, ConfigError, load_config, read_yaml, to_dict
from distcur.data import default_prior_sources, load_steps, scores_key, steps_key, target_source
from distcur.datamodels.metagrad import (
    RECIPES,
    MetagradRunConfig,
    datamil_metagrad_scores,
    datamil_reference_scores,
)
from distcur.datamodels.proxy import split_target
from distcur.datamodels.regression import (
    PENALTIES,
    fit_linear_datamodel,
    linear_datamodeling_score,
    tau_reliability,
)
from distcur.datamodels.subsets import SubsetTrainingData, masks_table, subset_masks
from distcur.distributed.raytrain import EXECUTORS, RayTrainSettings, check_executor
from distcur.policy.functional import AdamConfig, Normalizer, PolicySpec
from distcur.policy.proxy import PROXIES, check_proxy, make_proxy_fn
from distcur.policy.train import source_action_standardizer
from distcur.progress import bar
from distcur.schema import SCORE_SCHEMA
from distcur.sources.metaworld import PRIOR_SOURCE as METAWORLD_SOURCE
from distcur.sources.metaworld import STAGE as METAWORLD_STAGE
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
    lds_independent_seeds: bool = True

    def __post_init__(self):
        if self.num_models < 4 or self.heldout_models < 3:
            raise ValueError(f"regression needs num_models >= 4 and heldout_models >= 3, got {self}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"regression.penalty must be one of {PENALTIES}, got {self.penalty!r}")


@dataclass
class MetagradSettings:
    # distcur: K differentiated steps with the candidates in every batch, independent iterations;
    # datamil: the public reference's recipe, one special batch at step T - K (METAGRAD_PRESETS).
    recipe: str = "distcur"
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
    estimator: str = "regression"
    prior_sources: tuple[str, ...] | None = None  # None: every ingested non-target source in the store
    cluster: str = "episode"
    horizon: int = DEFAULT_HORIZON
    # The subset model: small, so that many train at once; 128 wide, because at 64 the batched GEMMs
    # are too small to run efficiently (gemm_fraction 0.44 vs 0.60 measured in one run, under load).
    hidden: tuple[int, ...] = (128, 128)
    lr: float = 1e-3
    batch_size: int = 256
    # auto: inject half the target demos unless every prior source is simulated MetaWorld (module
    # docstring); true / false force it. The resolved value is in the manifests' metadata.
    inject_target: bool | str = "auto"
    target_fraction: float = 0.25  # share of each batch drawn from the injected target half, if injecting
    # mse: the tanh-Gaussian NLL is lowered by data that widens the predicted std, and with 1024
    # models its datamodel picked 15 failed rollouts of 19 on pick-place-wall (success 0.19 vs 0.61).
    proxy: str = "mse"  # mse | nll (distcur.datamodels.proxy)
    # Cross-fitting: half the models (meta-gradient iterations) inject target half A and score on
    # half B, the other half swap, so the proxy covers every target demo at the same compute. Off by
    # default: on pick-place-wall it did not help (success 0.30 vs 0.61 without, 3 seeds x 50 episodes).
    cross_fit: bool = False
    seed: int = 0
    regression: RegressionSettings = field(default_factory=RegressionSettings)
    metagrad: MetagradSettings = field(default_factory=MetagradSettings)
    address: str | None = None
    max_retries: int = 1  # ray-tasks: retries of a batch's task
    executor: str = "ray-tasks"  # ray-tasks | ray-train (module docstring)
    ray_train: RayTrainSettings = field(default_factory=RayTrainSettings)

    def __post_init__(self):
        check_executor(self.executor)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.cluster not in CLUSTER_LEVELS:
            raise ValueError(f"cluster must be one of {CLUSTER_LEVELS}, got {self.cluster!r}")
        if not 0 <= self.target_fraction < 1:
            raise ValueError(f"target_fraction must be in [0, 1), got {self.target_fraction}")
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


def merge_options(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_options(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_config(source: str | dict | None = None, full: bool = False, metagrad_preset: str | None = None,
                **overrides: Any) -> DatamodelConfig:
    """Defaults (demo size), then ``FULL_PRESET`` if ``full``, then ``METAGRAD_PRESETS[metagrad_preset]``,
    then the YAML/dict, then overrides."""
    data: dict = {}
    if full:
        data = merge_options(data, FULL_PRESET)
    if metagrad_preset is not None:
        if metagrad_preset not in METAGRAD_PRESETS:
            raise ValueError(f"metagrad_preset must be one of {sorted(METAGRAD_PRESETS)}, "
                             f"got {metagrad_preset!r}")
        data = merge_options(data, METAGRAD_PRESETS[metagrad_preset])
    try:
        return load_config(DatamodelConfig, merge_options(data, _read(source)), **overrides)
    except ConfigError as e:
        if isinstance(source, str | os.PathLike):
            raise ConfigError(f"{source}: {e}") from None
        raise


def _read(source: str | dict | None) -> dict:
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
                inputs: dict[str, str], target_fraction: float,
                fault_marker: str | None = None) -> tuple[np.ndarray, dict]:
    from distcur.distributed.datamodels import SubsetTrainSettings, run_subset_batches

    r = cfg.regression
    m, h, c = r.num_models, r.heldout_models, folds[0].n_clusters
    models = np.arange(m + h)
    masks = subset_masks(models, c, r.keep_prob, cfg.seed)
    splits = ["train"] * m + ["heldout"] * h
    store.write_table(f"datamodels/{run}/masks", masks_table(models, splits, masks), stage="datamodel-masks",
                      config={"n_clusters": c, "keep_prob": r.keep_prob, "seed": cfg.seed, "models": m + h},
                      inputs=inputs)
    settings = SubsetTrainSettings(spec, AdamConfig(lr=cfg.lr), r.steps, cfg.batch_size, target_fraction,
                                   cfg.seed, shared_init=r.common_random_numbers, proxy=cfg.proxy)
    # Model j trains in fold j % n_folds: its masks stay those of the single-fold design.
    n_folds = len(folds)
    fold_of = models % n_folds
    parts, stats = [], {"batches": 0, "trained": 0, "skipped": 0}
    for f, data in enumerate(folds):
        sel = fold_of == f
        part, st = run_subset_batches(store, _fold_run(run, f, n_folds), models[sel], masks[sel], data, settings,
                                      r.models_per_batch, inputs, cfg.address, cfg.max_retries, fault_marker,
                                      cfg.executor, cfg.ray_train)
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
    store.write_table(f"datamodels/{run}/results", results, stage="datamodel-results",
                      config=settings.as_dict(), inputs=inputs, metadata=stats)
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
                                            masks[sel], data, independent, 1, inputs, cfg.address,
                                            cfg.max_retries, fault_marker, cfg.executor, cfg.ray_train)[0])
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
              target_fraction: float, inputs: dict[str, str],
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
        if cfg.executor == "ray-train":
            from distcur.distributed.metagrad import MetagradFold, run_metagrad_iterations

            jobs = [MetagradFold(f, data, spec, adam, run_cfgs[f], cfg.proxy, mg.round_size)
                    for f, data in enumerate(folds)]
            per_fold = run_metagrad_iterations(store, run, jobs, inputs, cfg.ray_train, cfg.address,
                                               iterations_bar, fault_marker)
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


def run_datamodel(store: Store | str, estimator: str, target_task: str, run: str,
                  cfg: DatamodelConfig | None = None, fault_marker: str | None = None) -> Manifest:
    """Score the prior's clusters for ``target_task``; returns the manifest of ``scores/<run>``.

    Skipped (the committed manifest returned) when ``scores/<run>`` was made from the same
    config and inputs."""
    store = store if isinstance(store, Store) else Store(store)
    cfg = cfg or DatamodelConfig()
    cfg = dataclasses.replace(cfg, estimator=estimator,
                              prior_sources=tuple(default_prior_sources(store, cfg.prior_sources)))
    # where it runs is not what it computes: the executor and its scaling stay out of the config
    config = {k: v for k, v in to_dict(cfg).items() if k not in ("executor", "ray_train")}
    config = {**config, "target": target_task, "address": None}
    sources = [*cfg.prior_sources, target_source(target_task)]
    inputs = {steps_key(s): store.input_fingerprint(steps_key(s)) for s in sources}
    key = scores_key(run)
    if store.is_done(key, "datamodel", config, inputs):
        log.info("datamodel %s: up to date, skipped", run)
        return store.manifest(key)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    inject = resolve_inject_target(store, cfg)
    target_fraction = cfg.target_fraction if inject else 0.0
    prior, clusters, folds, spec = _prepare(store, cfg, target_task, inject)
    if estimator == "regression":
        tau, meta = _regression(store, run, cfg, folds, spec, inputs, target_fraction, fault_marker)
    else:
        tau, meta = _metagrad(store, run, cfg, folds, spec, target_fraction, inputs, fault_marker)
    meta = {**meta, "executor": cfg.executor, "inject_target": inject, "target_fraction": target_fraction,
            "proxy_demos": "all target demos" if not inject else "the held-out target half"}
    store.write_table(
        f"datamodels/{run}/tau",
        pa.table({"cluster": np.arange(clusters.n_clusters, dtype=np.int64), "key": clusters.keys.astype(str),
                  "size": clusters.sizes(), "tau": tau.astype(np.float64)}),
        stage="datamodel-tau", config=config, inputs=inputs, metadata=meta,
    )
    # tau / the meta-gradient is the change of the proxy *loss*: the score is its negative.
    score = -tau[clusters.ids]
    table = pa.Table.from_pydict(
        {"source": prior.source.astype(str), "episode": prior.episode, "step": prior.step,
         "score": score.astype(np.float64), "method": [METHOD_NAMES[estimator]] * len(prior)},
        schema=SCORE_SCHEMA,
    )
    meta = {**meta, "clusters": clusters.n_clusters, "cluster": cfg.cluster, "compute_s": round(time.time() - t0, 2)}
    return store.write_table(key, table, stage="datamodel", config=config, inputs=inputs, metadata=meta)


def register(subparsers) -> None:
    p = subparsers.add_parser("datamodel", help="DataMIL datamodel scores (regression or meta-gradient)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="regression")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--target", required=True, help="target task name (its demos at steps/source=target-<task>)")
    p.add_argument("--run", default=None, help="run name (default: datamodel-<estimator>-<target>)")
    p.add_argument("--cluster", choices=CLUSTER_LEVELS, default=None)
    p.add_argument("--prior-sources", nargs="+", default=None,
                   help="prior step sources (default: every ingested source but the target-* ones)")
    p.add_argument("--horizon", type=int, default=None, help="steps per sub-trajectory cluster")
    p.add_argument("--proxy", choices=PROXIES, default=None,
                   help="proxy loss on the held-out target half: mse (the executed action's error, default) or nll (BC loss)")
    p.add_argument("--cross-fit", action="store_true", default=None,
                   help="also score with the target halves swapped (half the models each) and fit one tau")
    p.add_argument("--inject-target", choices=("auto", "true", "false"), default=None,
                   help="mix half the target demos into the estimation runs (auto, default: not for "
                        "simulated MetaWorld priors, as the paper; the proxy then uses all target demos)")
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="meta-gradient recipe: distcur (default) or datamil (the reference code's training "
                        "pool and special batch)")
    p.add_argument("--metagrad-preset", choices=sorted(METAGRAD_PRESETS), default=None,
                   help="datamil: the reference recipe at 2-core size; datamil-paper: at the paper's "
                        "MetaWorld size")
    p.add_argument("--lds-independent-seeds", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the held-out subsets with independent seeds for a second LDS "
                        "(default on)")
    p.add_argument("--config", default=None, help="YAML with DatamodelConfig options")
    p.add_argument("--full", action="store_true", help="paper-size preset (3x400 policy, K=100 of T=1100, ...)")
    add_rerun_options(p)
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="ray-tasks (default): subset-model batches as Ray tasks, meta-gradient iterations on the "
                        "driver; ray-train: both on one TorchTrainer (--workers, --gpus-per-worker)")
    p.add_argument("--workers", type=int, default=None, help="ray-train: TorchTrainer workers (default 2)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="ray-train: GPUs per worker (default 0: CPU workers)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    # Nested options are merged into the YAML's (a top-level override would replace the whole section).
    nested: dict[str, Any] = {}
    if args.recipe is not None:
        nested["metagrad"] = {"recipe": args.recipe}
    if args.lds_independent_seeds is not None:
        nested["regression"] = {"lds_independent_seeds": args.lds_independent_seeds}
    scaling = {"num_workers": args.workers, "gpus_per_worker": args.gpus_per_worker}
    if any(v is not None for v in scaling.values()):
        nested["ray_train"] = {k: v for k, v in scaling.items() if v is not None}
    inject = {None: None, "auto": "auto", "true": True, "false": False}[args.inject_target]
    cfg = make_config(merge_options(_read(args.config), nested), args.full, args.metagrad_preset,
                      cluster=args.cluster, horizon=args.horizon,
                      prior_sources=tuple(args.prior_sources) if args.prior_sources else None, address=args.address,
                      estimator=args.estimator, proxy=args.proxy, cross_fit=args.cross_fit,
                      inject_target=inject, executor=args.executor)
    run = args.run or f"datamodel-{args.estimator}-{args.target}"
    m = run_datamodel(output_store(args.store, args), args.estimator, args.target, run, cfg)
    print(f"scores/{run}: {m.rows} steps, {m.metadata.get('clusters')} clusters"
          + (f", LDS {m.metadata['lds']:.3f}" if "lds" in m.metadata else "")
          + (f" (independent seeds {m.metadata['lds_independent_seeds']:.3f})"
             if m.metadata.get("lds_independent_seeds") is not None else "")
          + f", target injected: {m.metadata['inject_target']}")
    return 0
