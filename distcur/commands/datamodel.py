"""``distcur datamodel``: DataMIL scores of the prior's clusters for a target task.

Estimators (METHODS.md §3):

* ``regression``: m random cluster subsets, one small policy per subset (trained k at a time,
  batches spread over Ray tasks, resumable per batch), tau by regularised least squares,
  checked by the LDS on held-out subsets and by the split-half agreement of tau;
* ``metagrad``: exact meta-gradients of the proxy with respect to the clusters' loss weights.

Outputs: ``scores/<run>`` (SCORE_SCHEMA, one row per prior step carrying its cluster's score,
higher = more useful), ``datamodels/<run>/tau`` (per cluster), and for the regression
``datamodels/<run>/masks`` and ``datamodels/<run>/results`` (merged; per-batch parts under
``results/batch=<i>``, or ``fold=<f>/results/batch=<i>`` with ``cross_fit``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from distcur.clusters import CLUSTER_LEVELS, DEFAULT_HORIZON, cluster_ids
from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE, ConfigError, load_config, read_yaml, to_dict
from distcur.data import load_steps, scores_key, steps_key, target_source
from distcur.datamodels.metagrad import MetagradRunConfig, datamil_metagrad_scores
from distcur.datamodels.proxy import PROXIES, check_proxy, make_proxy_fn, split_target
from distcur.datamodels.regression import (
    PENALTIES,
    fit_linear_datamodel,
    linear_datamodeling_score,
    tau_reliability,
)
from distcur.datamodels.subsets import SubsetTrainingData, masks_table, subset_masks
from distcur.policy.functional import AdamConfig, Normalizer, PolicySpec
from distcur.schema import SCORE_SCHEMA
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

    def __post_init__(self):
        if self.num_models < 4 or self.heldout_models < 3:
            raise ValueError(f"regression needs num_models >= 4 and heldout_models >= 3, got {self}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"regression.penalty must be one of {PENALTIES}, got {self.penalty!r}")


@dataclass
class MetagradSettings:
    total_steps: int = 500  # T
    meta_steps: int = 50  # K
    iterations: int = 32  # each cluster scored 16 times at candidate_fraction 0.5
    candidate_fraction: float = 0.5
    checkpoint_every: int | None = None  # None: ceil(sqrt(K))


@dataclass
class DatamodelConfig:
    estimator: str = "regression"
    prior_sources: tuple[str, ...] = ("metaworld",)
    cluster: str = "episode"
    horizon: int = DEFAULT_HORIZON
    # The subset model: small, so that many train at once; 128 wide, because at 64 the batched GEMMs
    # are too small to run efficiently (gemm_fraction 0.44 vs 0.60 measured in one run, under load).
    hidden: tuple[int, ...] = (128, 128)
    lr: float = 1e-3
    batch_size: int = 256
    target_fraction: float = 0.25  # share of each batch drawn from the injected target half
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
    max_retries: int = 1

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.cluster not in CLUSTER_LEVELS:
            raise ValueError(f"cluster must be one of {CLUSTER_LEVELS}, got {self.cluster!r}")
        if not 0 <= self.target_fraction < 1:
            raise ValueError(f"target_fraction must be in [0, 1), got {self.target_fraction}")
        check_proxy(self.proxy)


# Paper size (DataMIL's MetaWorld settings): 3 x 400 policy, K = 100 of T = 1100, 50 iterations.
FULL_PRESET: dict[str, Any] = {
    "hidden": (400, 400, 400),
    "regression": {"num_models": 1024, "heldout_models": 64, "steps": 1100, "models_per_batch": 32},
    "metagrad": {"total_steps": 1100, "meta_steps": 100, "iterations": 50},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_config(source: str | dict | None = None, full: bool = False, **overrides: Any) -> DatamodelConfig:
    """Defaults (demo size), then ``FULL_PRESET`` if ``full``, then the YAML/dict, then overrides."""
    data: dict = {}
    if full:
        data = _merge(data, FULL_PRESET)
    if isinstance(source, dict):
        data = _merge(data, source)
    elif source is not None:
        data = _merge(data, read_yaml(source) or {})
        try:
            return load_config(DatamodelConfig, data, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return load_config(DatamodelConfig, data, **overrides)


def _prepare(store: Store, cfg: DatamodelConfig, target_task: str):
    """(prior, clusters, one SubsetTrainingData per fold, spec). Fold 0 injects the first target
    half and scores on the second; with ``cross_fit`` fold 1 swaps them."""
    prior = load_steps(store, list(cfg.prior_sources))
    target = load_steps(store, [target_source(target_task)])
    if prior.state.shape[1] != target.state.shape[1] or prior.action.shape[1] != target.action.shape[1]:
        raise ValueError(
            f"prior {list(cfg.prior_sources)} has state/action dims {prior.state.shape[1]}/{prior.action.shape[1]} "
            f"but target {target_source(target_task)} has {target.state.shape[1]}/{target.action.shape[1]}"
        )
    clusters = cluster_ids(prior, cfg.cluster, cfg.horizon)
    split = split_target(target, cfg.seed)
    all_act = np.concatenate([prior.action, target.action])
    bounds = (-1.0, 1.0) if np.abs(all_act).max() <= 1.0 else None
    norm = Normalizer.fit(np.concatenate([prior.state, target.state]), all_act, bounds)
    halves = [(split.inject, split.proxy)] + ([(split.proxy, split.inject)] if cfg.cross_fit else [])
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


def _regression(store: Store, run: str, cfg: DatamodelConfig, folds: list[SubsetTrainingData], spec: PolicySpec,
                inputs: dict[str, str], fault_marker: str | None = None) -> tuple[np.ndarray, dict]:
    from distcur.distributed.datamodels import SubsetTrainSettings, run_subset_batches

    r = cfg.regression
    m, h, c = r.num_models, r.heldout_models, folds[0].n_clusters
    models = np.arange(m + h)
    masks = subset_masks(models, c, r.keep_prob, cfg.seed)
    splits = ["train"] * m + ["heldout"] * h
    store.write_table(f"datamodels/{run}/masks", masks_table(models, splits, masks), stage="datamodel-masks",
                      config={"n_clusters": c, "keep_prob": r.keep_prob, "seed": cfg.seed, "models": m + h},
                      inputs=inputs)
    settings = SubsetTrainSettings(spec, AdamConfig(lr=cfg.lr), r.steps, cfg.batch_size, cfg.target_fraction,
                                   cfg.seed, shared_init=r.common_random_numbers, proxy=cfg.proxy)
    # Model j trains in fold j % n_folds: its masks stay those of the single-fold design.
    n_folds = len(folds)
    fold_of = models % n_folds
    parts, stats = [], {"batches": 0, "trained": 0, "skipped": 0}
    for f, data in enumerate(folds):
        sel = fold_of == f
        part, st = run_subset_batches(store, _fold_run(run, f, n_folds), models[sel], masks[sel], data, settings,
                                      r.models_per_batch, inputs, cfg.address, cfg.max_retries, fault_marker)
        parts.append(part.append_column("fold", pa.array(np.full(part.num_rows, f, np.int64))))
        stats = {k: stats[k] + st[k] for k in stats}
    results = pa.concat_tables(parts).sort_by("model")
    y_raw = results.column("proxy").to_numpy()
    # Each fold's proxy is a different held-out half, on its own scale: standardise y per fold
    # with its training models' mean and std, so one tau explains both (the fold means are the
    # per-fold biases).
    y, fold_stats = y_raw, []
    if n_folds > 1:
        y = np.empty_like(y_raw)
        for f in range(n_folds):
            train = y_raw[(fold_of == f) & (models < m)]
            mu, sd = float(train.mean()), float(train.std()) or 1.0
            y[fold_of == f] = (y_raw[fold_of == f] - mu) / sd
            fold_stats.append({"proxy_mean": mu, "proxy_std": sd})
    store.write_table(f"datamodels/{run}/results", results, stage="datamodel-results",
                      config=settings.as_dict(), inputs=inputs, metadata=stats)
    fit = fit_linear_datamodel(masks[:m], y[:m], r.penalty, r.cv_folds, cfg.seed)
    lds = linear_datamodeling_score(fit, masks[m:], y[m:])
    rel = tau_reliability(masks[:m], y[:m], 0.1, r.penalty, r.cv_folds, cfg.seed)
    meta = {"lds": lds, "tau_split_half_spearman": rel["split_half_spearman"], "tau_top10_overlap": rel["top_overlap"],
            "penalty": fit.penalty, "alpha": fit.alpha, "cv_mse": fit.cv_mse,
            "cv_mse_by_penalty": fit.cv_mse_by_penalty, "bias": fit.bias, "proxy_mean": float(y_raw.mean()),
            "proxy_std": float(y_raw.std()), **({"folds": fold_stats} if fold_stats else {}), **stats}
    log.info("datamodel %s: LDS %.3f (%s, alpha %.3g); tau split-half Spearman %.2f, top-10%% overlap %.2f",
             run, lds, fit.penalty, fit.alpha, rel["split_half_spearman"], rel["top_overlap"])
    return fit.tau, meta


def _metagrad(cfg: DatamodelConfig, folds: list[SubsetTrainingData], spec: PolicySpec) -> tuple[np.ndarray, dict]:
    mg = cfg.metagrad
    n_folds = len(folds)
    # The iterations are shared among the folds (the same compute as one fold); each fold's mean
    # meta-gradients are in its own proxy's units, so they are divided by their spread over the
    # clusters before averaging.
    iters = [max(1, mg.iterations // n_folds + (f < mg.iterations % n_folds)) for f in range(n_folds)]
    scores, counts = [], []
    for f, data in enumerate(folds):
        run_cfg = MetagradRunConfig(mg.total_steps, mg.meta_steps, iters[f], mg.candidate_fraction,
                                    cfg.batch_size, cfg.target_fraction, mg.checkpoint_every, cfg.seed + 7919 * f)
        proxy_fn = make_proxy_fn(spec, torch.as_tensor(data.proxy_obs), torch.as_tensor(data.proxy_act), cfg.proxy)
        grads, count = datamil_metagrad_scores(
            spec, AdamConfig(lr=cfg.lr), torch.as_tensor(data.obs), torch.as_tensor(data.act),
            torch.as_tensor(data.group), data.n_clusters, proxy_fn, run_cfg,
        )
        if n_folds > 1:
            sd = float(grads[count > 0].std()) if (count > 0).any() else 0.0
            grads = grads / sd if sd > 0 else grads
        scores.append(grads)
        counts.append(count)
    grads, count = np.mean(scores, axis=0), np.sum(counts, axis=0)
    return grads, {"iterations": int(sum(iters)), "folds": n_folds,
                   "min_count": int(count.min()), "max_count": int(count.max())}


def run_datamodel(store: Store | str, estimator: str, target_task: str, run: str,
                  cfg: DatamodelConfig | None = None, fault_marker: str | None = None) -> Manifest:
    """Score the prior's clusters for ``target_task``; returns the manifest of ``scores/<run>``.

    Skipped (the committed manifest returned) when ``scores/<run>`` was made from the same
    config and inputs."""
    store = store if isinstance(store, Store) else Store(store)
    cfg = dataclasses.replace(cfg or DatamodelConfig(), estimator=estimator)
    config = {**to_dict(cfg), "target": target_task, "address": None}
    sources = [*cfg.prior_sources, target_source(target_task)]
    inputs = {steps_key(s): store.input_fingerprint(steps_key(s)) for s in sources}
    key = scores_key(run)
    if store.is_done(key, "datamodel", config, inputs):
        log.info("datamodel %s: up to date, skipped", run)
        return store.manifest(key)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    prior, clusters, folds, spec = _prepare(store, cfg, target_task)
    if estimator == "regression":
        tau, meta = _regression(store, run, cfg, folds, spec, inputs, fault_marker)
    else:
        tau, meta = _metagrad(cfg, folds, spec)
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
    p.add_argument("--horizon", type=int, default=None, help="steps per sub-trajectory cluster")
    p.add_argument("--proxy", choices=PROXIES, default=None,
                   help="proxy loss on the held-out target half: mse (the executed action's error, default) or nll (BC loss)")
    p.add_argument("--cross-fit", action="store_true", default=None,
                   help="also score with the target halves swapped (half the models each) and fit one tau")
    p.add_argument("--config", default=None, help="YAML with DatamodelConfig options")
    p.add_argument("--full", action="store_true", help="paper-size preset (3x400 policy, K=100 of T=1100, ...)")
    add_rerun_options(p)
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = make_config(args.config, args.full, cluster=args.cluster, horizon=args.horizon, address=args.address,
                      estimator=args.estimator, proxy=args.proxy, cross_fit=args.cross_fit)
    run = args.run or f"datamodel-{args.estimator}-{args.target}"
    m = run_datamodel(output_store(args.store, args), args.estimator, args.target, run, cfg)
    print(f"scores/{run}: {m.rows} steps, {m.metadata.get('clusters')} clusters"
          + (f", LDS {m.metadata['lds']:.3f}" if "lds" in m.metadata else ""))
    return 0
