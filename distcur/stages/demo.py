"""``distcur demo``: the whole pipeline on the embedded MetaWorld default, end to end.

ingest (MetaWorld prior + target + held-out target demos for the proxy) -> embed (state-action
VAE) -> every scorer (SR, AR, BR, STRAP, IWR, random) and both DataMIL estimators -> select one
budget of prior steps per method -> co-train one policy per (method, seed) -> MetaWorld rollouts
+ proxy loss -> a comparison table (success mean and standard error over seeds, and each
method's paired difference to random and to the best similarity method) in ``evals/<run>`` and
on stdout.

**One data budget.** Every method selects the same share of prior *steps* (``budget_percent``,
default 10%), at its own granularity: SR / AR / BR / IWR per step (``retrieval_level``), STRAP its
matched segments (every segment's best match, then every segment's second, ...), DataMIL its
clusters (the datamodel's ``cluster``: episode or sub-trajectory), random at each of these
(``random``, ``random-subtraj``, ``random-episode``), and the ``oracle`` reference row random among
the prior's successful demos. Ties are broken by a seeded permutation; the last cluster is cut.

Every stage is the same function its CLI calls, so each is skipped on a rerun whose config and
inputs match (the store's manifests), and the demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from distcur.config import DEFAULT_STORE, load_config, merge_options, to_dict
from distcur.data import eval_key, heldout_source, scores_key, selection_key, steps_key, target_source
from distcur.envs.generation import PRIOR_KINDS, MetaWorldPriorConfig
from distcur.methods import REGISTRY, names
from distcur.policy.train import TrainConfig
from distcur.stages.output import commit_table
from distcur.store import Store

log = logging.getLogger(__name__)

SCORERS = names("scorer")
# the random scorer at the demo's retrieval level ("random") and at fixed granularities
RANDOM_METHODS = ("random", *names("random"))
DATAMODELS = names("datamodel")
BASELINES = names("baseline")
REFERENCES = names("reference")
ALL_METHODS = names()
# What ``distcur demo`` runs unless told: every method, random at the step and episode granularities.
DEFAULT_METHODS = tuple(m for m in ALL_METHODS if m != "random-subtraj")


# The quick demo trains 256 subset models instead of the datamodel's default 1024 and runs 8
# meta-gradient iterations instead of 32, so that ``make demo`` fits in 10 minutes; its scores are
# noisier (the log gives the regression's split-half reliability).
DEMO_DATAMODEL: dict[str, Any] = {"regression": {"num_models": 256, "heldout_models": 32}, "metagrad": {"iterations": 8}}
# The demo's policy: smaller and shorter-trained than the protocol's, so that ``make demo`` fits in 10 minutes.
# One policy per (method, seed): the seed is the job's, and no intermediate checkpoints are written.
DEMO_TRAIN: dict[str, Any] = {"hidden": (256, 256), "steps": 1500, "checkpoint_every": 0}
# The benchmark protocol's policy and rollout horizon (DataMIL's MetaWorld setting), with the datamodel's
# own defaults; ``full()`` adds the paper-size prior and datamodel, ``distcur demo --protocol-policy``
# uses them on the demo prior.
PROTOCOL_POLICY: dict[str, Any] = {"train": {"hidden": (400, 400, 400), "steps": 4000},
                                   "evaluation": {"max_steps": 500}, "datamodel": {}}
# Per prior kind, the demo's prior size: the hard prior is 12 tasks x (8 + 8) episodes; the DataMIL-like
# prior every usable v3 task x (10 + 10), about 980 trajectories.
DEMO_PRIORS: dict[str, dict[str, Any]] = {
    "hard": {"success_per_task": 8, "failed_per_task": 8, "failed_max_steps": 150, "max_steps": 300},
    "datamil": {"success_per_task": 10, "failed_per_task": 10},
}


@dataclass
class DemoEvaluation:
    """How the demo measures each policy: MetaWorld rollouts and the held-out proxy."""

    episodes: int = field(default=20, metadata={"help": "rollouts per (method, seed)"})
    max_steps: int = field(default=300, metadata={"help": "rollout horizon"})
    heldout_demos: int = field(default=5, metadata={"help": "fresh expert demos of the target for the reported "
                                                            "proxy (never trained on)"})

    def __post_init__(self):
        if self.episodes < 1 or self.max_steps < 1 or self.heldout_demos < 1:
            raise ValueError(f"DemoEvaluation: episodes, max_steps and heldout_demos must be >= 1, got "
                             f"{self.episodes}, {self.max_steps}, {self.heldout_demos}")


def full_options() -> dict[str, Any]:
    """The options of :meth:`DemoConfig.full`: the protocol policy, 3 seeds x 50 rollouts, the
    paper-size prior and datamodel."""
    from distcur.stages.datamodel import FULL_PRESET

    return merge_options({"seeds": (0, 1, 2), "evaluation": {"episodes": 50}, "datamodel": dict(FULL_PRESET),
                          "prior": {"success_per_task": 50, "failed_per_task": 50}}, PROTOCOL_POLICY)


def _demo_train() -> TrainConfig:
    return TrainConfig(**DEMO_TRAIN)


@dataclass
class DemoConfig:
    """The demo's settings; the defaults fit in 10 minutes on 2 cores, ``full()`` is paper size.

    ``train`` is the co-trained policy's :class:`TrainConfig` (its ``seed`` is each job's, and its
    ``alpha`` the target share when co-training); ``evaluation`` how each policy is measured."""

    store: str = field(default=os.path.join(DEFAULT_STORE, "demo"), metadata={"help": "store URI"})
    run: str = field(default="demo", metadata={"help": "run name"})
    target: str = field(default="pick-place-wall-v3", metadata={"help": "MetaWorld target task"})
    methods: tuple[str, ...] = field(default=DEFAULT_METHODS, metadata={
        "help": f"subset of methods to compare: {', '.join(ALL_METHODS)}", "choices": ALL_METHODS})
    seeds: tuple[int, ...] = field(default=(0, 1), metadata={"help": "policy seeds (one policy per method and seed)"})
    budget_percent: float = field(default=10.0, metadata={"help": "share of the prior's steps every method selects"})
    retrieval_level: str = field(default="step", metadata={
        "help": "granularity of SR / AR / BR / IWR and of random (step, as their papers, or subtraj)",
        "choices": ("step", "subtraj")})
    horizon: int = field(default=30, metadata={"help": "sub-trajectory length of the subtraj granularity"})
    tie_seed: int = field(default=0, metadata={"help": "the permutation that breaks score ties in every selection"})
    cotrain: bool = field(default=True, metadata={
        "help": "co-train on target and selection (--no-cotrain: the selection alone, DataMIL's final MetaWorld policy)"})
    train: TrainConfig = field(default_factory=_demo_train)
    evaluation: DemoEvaluation = field(default_factory=DemoEvaluation)
    prior_kind: str = field(default="hard", metadata={
        "help": "hard (the target's successes left out of the prior) or datamil (every usable v3 task, 10 demos + "
                "10 failures each, the target's own demos in the prior)", "choices": PRIOR_KINDS})
    # MetaWorldPriorConfig options (default: DEMO_PRIORS[prior_kind])
    prior: dict[str, Any] | None = None
    # VAEConfig options of the BR / STRAP / IWR embedding
    vae: dict[str, Any] = field(default_factory=lambda: {"train_steps": 1500})
    iwr: dict[str, Any] = field(default_factory=dict)  # options of the IWR scorer (bandwidth, kernel, ...)
    datamodel: dict[str, Any] = field(default_factory=lambda: dict(DEMO_DATAMODEL))  # DatamodelConfig options
    address: str | None = field(default=None, metadata={"help": "Ray address (default: local Ray or RAY_ADDRESS)"})

    def __post_init__(self):
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"DemoConfig.methods: unknown {unknown}; known: {ALL_METHODS}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ValueError("DemoConfig.seeds: need at least one seed")
        if not 0 < self.budget_percent <= 100:
            raise ValueError(f"DemoConfig.budget_percent must be in (0, 100], got {self.budget_percent}")
        if self.retrieval_level not in ("step", "subtraj"):
            raise ValueError(f"DemoConfig.retrieval_level must be 'step' or 'subtraj', got {self.retrieval_level!r}")
        if self.prior_kind not in PRIOR_KINDS:
            raise ValueError(f"DemoConfig.prior_kind must be one of {PRIOR_KINDS}, got {self.prior_kind!r}")
        if self.prior is None:
            self.prior = dict(DEMO_PRIORS[self.prior_kind])

    @classmethod
    def full(cls, **overrides) -> DemoConfig:
        """The reference size (hours on 2 cores; meant for a cluster); ``overrides`` as nested options."""
        return load_config(cls, merge_options(full_options(), {k: v for k, v in overrides.items() if v is not None}))

    def policy_config(self, seed: int, selected: bool) -> TrainConfig:
        """The TrainConfig of the policy of one (method, seed) job; ``selected``: it trains on a selection
        (else on the target alone)."""
        alpha = (self.train.alpha if self.cotrain else 0.0) if selected else 1.0
        return dataclasses.replace(self.train, seed=seed, alpha=alpha)

    def flat(self) -> dict[str, Any]:
        """The settings as one flat dict, as the demo's manifests fingerprint them (the layout they had
        before ``train`` and ``evaluation`` were nested, so stores made then stay current)."""
        d = {k: v for k, v in to_dict(self).items() if k not in ("train", "evaluation")}
        t = self.train
        d.update(to_dict(self.evaluation), alpha=t.alpha, mixing=t.mixing, train_steps=t.steps,
                 batch_size=t.batch_size, hidden=t.hidden, lr=t.lr)
        return {**d, **self.train_extras()}

    def train_extras(self) -> dict[str, Any]:
        """The training options set away from the demo's defaults besides those :meth:`flat` names
        (``train.<option>``: they change a policy, so they join its fingerprint; how it computes, its
        device and logging, does not)."""
        default, mine = to_dict(_demo_train()), to_dict(self.train)
        named = ("alpha", "mixing", "steps", "batch_size", "hidden", "lr", "seed", "device", "log_every")
        return {f"train.{k}": v for k, v in mine.items() if k not in named and v != default[k]}

    def prior_config(self) -> MetaWorldPriorConfig:
        if self.prior_kind == "datamil":
            return MetaWorldPriorConfig.datamil(self.target, **self.prior)
        return MetaWorldPriorConfig(target=self.target, **self.prior)

    def level_of(self, method: str) -> str:
        """The granularity at which ``method`` fills the step budget."""
        if method in DATAMODELS:
            from distcur.stages.datamodel import make_config

            return make_config(dict(self.datamodel)).cluster
        return REGISTRY[method].level or self.retrieval_level  # STRAP, oracle, random-<level>: their own


# -- stages -----------------------------------------------------------------------------------


def ingest(cfg: DemoConfig, store: Store) -> dict:
    """The MetaWorld prior and target, plus held-out target demos for the proxy."""
    from distcur.distributed.tasks import RayTasks
    from distcur.stages.ingest import MetaWorldIngestConfig, run_metaworld

    config = MetaWorldIngestConfig(prior=cfg.prior_config(), heldout_demos=cfg.evaluation.heldout_demos)
    # a bar only where bars are drawn
    return run_metaworld(store, config, executor=RayTasks(cfg.address, progress=True, label="metaworld episodes"))


def score_all(cfg: DemoConfig, store: Store) -> dict[str, str | None]:
    """Score and select with every method in ``cfg.methods``; {method: selection run or None}."""
    from distcur.select import SelectConfig
    from distcur.stages import embed, score, select

    selections: dict[str, str | None] = {}
    if any(m in ("br", "strap", "iwr") for m in cfg.methods):
        embed.run(store, embed.EmbedConfig(encoder="vae", encoder_options=dict(cfg.vae)), address=cfg.address)
    for method in cfg.methods:
        run = f"{cfg.run}-{method}"
        t0 = time.time()
        if method in SCORERS or method in RANDOM_METHODS:
            score.run(store, score.ScoreConfig(method="random" if method in RANDOM_METHODS else method,
                                               target=cfg.target, run=run, scorer=scorer_options(cfg, method)),
                      address=cfg.address)
        elif method in DATAMODELS:
            from distcur.stages import datamodel

            dm_cfg = datamodel.make_config(dict(cfg.datamodel), address=cfg.address, estimator=method.split("-", 1)[1])
            datamodel.run(store, dm_cfg, cfg.target, run)
        elif method == "oracle":
            oracle_scores(store, cfg.target, run)
        else:
            selections[method] = None if method == "target_only" else method
            continue
        select_cfg = SelectConfig(budget_percent=cfg.budget_percent, level=cfg.level_of(method), horizon=cfg.horizon,
                                  tie_seed=cfg.tie_seed)
        m = select.select(store, run, run, select_cfg)
        selections[method] = run
        log.info("%s: scored and selected %.1f%% of the prior's steps (%s level) in %.1f s", method,
                 100 * m.metadata["selected_fraction"], select_cfg.level, time.time() - t0)
    return selections


def scorer_options(cfg: DemoConfig, method: str) -> dict[str, Any]:
    """The scorer options a method runs with in the demo."""
    if method in RANDOM_METHODS:
        level = cfg.level_of(method)
        return {"seed": 0, **({"level": level, "horizon": cfg.horizon} if level != "step" else {})}
    if method == "strap":  # every match, ranked within its segment: the budget decides how many are kept
        return {"k": None, "scoring": "rank"}
    if method == "iwr":
        return dict(cfg.iwr)
    return {}


def oracle_scores(store: Store, target: str, run: str) -> None:
    """``scores/<run>``: 1 for every step of a successful prior episode, 0 otherwise (the oracle
    reference row: selected at episode level, its ties broken at random, it is a random subset of
    the prior's successful demos)."""
    from distcur.data import default_prior_sources
    from distcur.schema import SCORE_SCHEMA

    sources = default_prior_sources(store)
    inputs = {steps_key(s): store.input_fingerprint(steps_key(s)) for s in sources}
    config = {"method": "oracle", "target": target, "prior_sources": sources}

    def make():
        parts = []
        for src in sources:
            t = store.read_table(steps_key(src), columns=["source", "episode", "step", "success"])
            parts.append(pa.Table.from_arrays(
                [t.column("source"), t.column("episode"), t.column("step"),
                 pa.array(t.column("success").to_numpy(zero_copy_only=False).astype(np.float64)),
                 pa.array(["oracle"] * t.num_rows, pa.string())], schema=SCORE_SCHEMA))
        return pa.concat_tables(parts), {"method": "oracle", "target": target}

    commit_table(store, scores_key(run), "score", config, inputs, make, quiet=True)


def baseline_run(cfg: DemoConfig, store: Store, kind: str) -> str:
    """Commit the selection of a baseline (all data) under ``selections/<run>-<kind>``."""
    from distcur.data import default_prior_sources
    from distcur.stages.select import selection_metadata
    from distcur.stages.train import baseline_selection

    run = f"{cfg.run}-{kind}"
    key = selection_key(run)
    sources = default_prior_sources(store)
    inputs = {steps_key(s): store.input_fingerprint(steps_key(s)) for s in sources}

    def make():
        table = baseline_selection(store, kind, sources=sources)
        prior_steps = sum(store.manifest(steps_key(s)).rows for s in sources)
        return table, {"method": kind, "target": cfg.target,
                       **selection_metadata(store, table, prior_steps, cfg.target)}

    commit_table(store, key, "select", {"baseline": kind}, inputs, make, quiet=True)
    return run


def train_and_evaluate(store_uri: str, cfg: DemoConfig, method: str, selection_run: str | None, seed: int) -> dict:
    """Co-train one policy on (target, selection) and measure success and held-out proxy loss.

    A plain function: the demo runs it as one Ray task per job (:meth:`distcur.distributed.tasks.RayTasks.each`)."""
    import torch

    from distcur.stages import evaluate

    torch.set_num_threads(1)
    ev = cfg.evaluation
    return evaluate.train_and_evaluate(Store(store_uri), cfg.target, selection_run,
                                       cfg.policy_config(seed, selected=selection_run is not None), method,
                                       ev.episodes, ev.max_steps)


RESULT_SCHEMA = pa.schema([
    ("method", pa.string()), ("task", pa.string()), ("prior", pa.string()), ("seed", pa.int64()),
    ("episodes", pa.int64()), ("success", pa.float64()), ("proxy_loss", pa.float64()),
    ("selected_steps", pa.int64()), ("budget", pa.float64()), ("selected_fraction", pa.float64()),
    ("level", pa.string()), ("train_s", pa.float64()), ("eval_s", pa.float64()),
])


JOB_FIELDS = ("target", "episodes", "max_steps", "heldout_demos", "alpha", "cotrain", "train_steps", "batch_size",
              "hidden", "lr")


def job_key(run: str, method: str, seed: int) -> str:
    """Where one (method, seed) policy's result row is committed as soon as it is evaluated."""
    return f"{eval_key(run)}/jobs/{method}/seed={seed}"


def describe_job(r: dict) -> tuple[str, str]:
    """One finished (method, seed) job: its log line, and the job bar's postfix."""
    line = (f"{r['method']:<22} seed {r['seed']}: success {r['success']:.2f}, proxy nll {r['proxy_loss']:.3f} "
            f"(train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s)")
    return line, f"{r['method']} seed {r['seed']}: success {r['success']:.2f}"


def _train_evaluate_resumable(store: Store, cfg: DemoConfig, jobs: list[tuple[str, str | None, int]]) -> list[dict]:
    """Every job's row, training only the jobs without a committed row made from the same policy,
    rollout and selection settings: a run stopped after hours loses only the jobs in flight, and
    adding seeds or methods trains only those."""
    from distcur.distributed.tasks import RayTasks

    # What a policy row depends on besides its inputs (target, held-out and selection fingerprints, which
    # capture the prior and every scoring choice): the training and evaluation settings only, so that
    # scorer options or methods added to the config do not invalidate rows already committed.
    flat = cfg.flat()
    shared = {k: v for k, v in flat.items() if k in JOB_FIELDS or k.startswith("train.")}
    if cfg.train.mixing != "bernoulli":
        shared["mixing"] = cfg.train.mixing
    data_inputs = {"target": store.input_fingerprint(steps_key(target_source(cfg.target))),
                   "heldout": store.input_fingerprint(steps_key(heldout_source(cfg.target)))}
    selection_inputs = {run: store.input_fingerprint(selection_key(run)) for _, run, _ in jobs if run}

    def job_spec(job):
        method, run, seed = job
        inputs = {**data_inputs, "selection": selection_inputs[run]} if run else data_inputs
        return job_key(cfg.run, method, seed), {**shared, "method": method, "seed": seed}, inputs

    specs = {job: job_spec(job) for job in jobs}
    done = {job: store.read_table(s[0]).to_pylist()[0] for job, s in specs.items()
            if store.is_done(s[0], "demo-job", *s[1:])}
    todo = [job for job in jobs if job not in done]
    if done:
        log.info("train/evaluate: %d of %d (method, seed) jobs already committed, training %d", len(done), len(jobs),
                 len(todo))

    def commit(job, row):
        key, config, inputs = specs[job]
        commit_table(store, key, "demo-job", config, inputs, lambda: (pa.Table.from_pylist([row]), None), force=True)

    fresh = {}
    if todo:
        calls = [(store.uri, cfg, method, run, seed) for method, run, seed in todo]
        # one CPU per job (the job keeps torch to one thread): a 2-core machine runs two at once, a
        # cluster spreads them over its nodes; a job whose worker died is retried twice
        jobs_executor = RayTasks(cfg.address, max_retries=2, label="policies", unit="job")
        rows = jobs_executor.each(train_and_evaluate, calls, on_result=lambda i, row: commit(todo[i], row),
                                  describe=describe_job)
        fresh = dict(zip(todo, rows, strict=True))
    return [done[job] if job in done else fresh[job] for job in jobs]


def run_demo(cfg: DemoConfig, force: bool = False) -> pa.Table:
    """Run every stage; returns (and commits at ``evals/<run>``) one row per (method, seed).

    Every stage and policy job already committed with the same config is reused, unless ``force``."""
    from distcur.distributed.session import ensure_ray

    t_start = time.time()
    store = Store(cfg.store, force=force)
    from distcur import progress

    # Ray's start takes seconds (more on a loaded machine) and prints nothing in the quiet default
    with progress.bar(total=None, desc="starting Ray", bar_format="{desc} {elapsed}"):
        ensure_ray(cfg.address)
    timings: dict[str, float] = {}

    t0 = time.time()
    info = ingest(cfg, store)
    timings["ingest"] = time.time() - t0
    prior_steps = info["prior"]["rows"]
    log.info("ingest: %d prior steps in %.1f s", prior_steps, timings["ingest"])

    t0 = time.time()
    selections = score_all(cfg, store)
    for kind in BASELINES:
        if kind in cfg.methods and kind != "target_only":
            selections[kind] = baseline_run(cfg, store, kind)
    timings["score_select"] = time.time() - t0
    diagnostics = selection_diagnostics(store, selections, cfg.target)

    jobs = [(m, selections[m], s) for m in cfg.methods for s in cfg.seeds]
    key = eval_key(cfg.run)
    inputs = {r: store.input_fingerprint(selection_key(r)) for r in selections.values() if r}
    config = {k: v for k, v in cfg.flat().items() if k not in ("store", "address")}

    def make():
        t0 = time.time()
        rows = _train_evaluate_resumable(store, cfg, jobs)
        timings["train_evaluate"] = time.time() - t0
        for r in rows:
            r["selected_fraction"] = r["selected_steps"] / prior_steps if prior_steps else 0.0
            r.update(prior=cfg.prior_kind, level=diagnostics.get(r["method"], {}).get("level"),
                     budget=cfg.budget_percent / 100 if r["method"] not in BASELINES else None)
        table = pa.Table.from_pylist([{k: r.get(k) for k in RESULT_SCHEMA.names} for r in rows], schema=RESULT_SCHEMA)
        timings["total"] = time.time() - t_start
        return table, {"timings_s": timings, "selections": diagnostics}

    commit_table(store, key, "demo", config, inputs, make, quiet=True)
    return store.read_table(key)


def selection_diagnostics(store: Store, selections: dict[str, str | None], target: str) -> dict[str, dict]:
    """Per method: its selection's level, size and make-up and its overlap (Jaccard of the step sets)
    with every other method's selection."""
    from distcur.composition import pairwise_jaccard
    from distcur.stages.select import selection_composition

    out: dict[str, dict] = {}
    tables = {}
    for method, run in selections.items():
        if not run:
            continue
        m = store.manifest(selection_key(run))
        composition = m.metadata.get("composition")
        table = None
        if method != "all":
            table = tables[method] = store.read_table(selection_key(run), columns=["source", "episode", "step"])
        if composition is None or m.metadata.get("target") != target:
            # made before its score run named the target (older IWR runs): no target shares stored
            table = table if table is not None else store.read_table(selection_key(run),
                                                                     columns=["source", "episode", "step"])
            composition = selection_composition(store, table, target)
        out[method] = {"level": m.config.get("level", "all" if method == "all" else None),
                       "selected_fraction": m.metadata.get("selected_fraction"), "composition": composition}
    for method, overlaps in pairwise_jaccard(tables).items():
        out[method]["jaccard"] = overlaps
    return out
