"""``distcur demo``: the whole pipeline on the embedded MetaWorld default, end to end.

ingest (MetaWorld prior + target + held-out target demos for the proxy) -> embed (state-action
VAE) -> every scorer (SR, AR, BR, STRAP, IWR, random) and both DataMIL estimators -> select top
x% -> co-train one policy per (method, seed) -> MetaWorld rollouts + proxy loss -> a comparison
table (success mean and standard error over seeds) in ``evals/<run>`` and on stdout.

Every stage is the same function its CLI calls, so each is skipped on a rerun whose config and
inputs match (the store's manifests), and the demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from distcur.config import DEFAULT_STORE, to_dict
from distcur.data import eval_key, selection_key, steps_key, target_source
from distcur.sources.metaworld import MetaWorldPriorConfig
from distcur.store import Store, fingerprint

log = logging.getLogger(__name__)

SCORERS = ("sr", "ar", "br", "strap", "iwr", "random")
DATAMODELS = ("datamodel-regression", "datamodel-metagrad")
BASELINES = ("target_only", "all")
ALL_METHODS = (*BASELINES, *SCORERS, *DATAMODELS)


def heldout_source(task: str) -> str:
    """Source of the held-out target demos that define the reported proxy loss.

    It starts with ``target-`` so no stage mistakes it for prior data."""
    return f"{target_source(task)}-heldout"


# The quick demo trains 256 subset models instead of the datamodel's default 1024 and runs 8
# meta-gradient iterations instead of 32, so that ``make demo`` fits in 10 minutes; its scores are
# noisier (the log gives the regression's split-half reliability).
DEMO_DATAMODEL: dict[str, Any] = {"regression": {"num_models": 256, "heldout_models": 32}, "metagrad": {"iterations": 8}}
# BENCHMARKS.md §1's policy and rollout horizon (DataMIL's MetaWorld setting), with the datamodel's
# own defaults; ``full()`` adds the paper-size prior and datamodel, ``distcur demo --protocol-policy``
# uses them on the demo prior.
PROTOCOL_POLICY: dict[str, Any] = {"hidden": (400, 400, 400), "train_steps": 4000, "max_steps": 500,
                                   "datamodel": {}}


@dataclass
class DemoConfig:
    """The demo's settings; the defaults fit in 10 minutes on 2 cores, ``full()`` is paper size."""

    store: str = os.path.join(DEFAULT_STORE, "demo")
    run: str = "demo"
    target: str = "pick-place-wall-v3"
    methods: tuple[str, ...] = ALL_METHODS
    seeds: tuple[int, ...] = (0, 1)
    episodes: int = 20  # rollouts per (method, seed)
    max_steps: int = 300  # rollout horizon
    heldout_demos: int = 5  # fresh expert demos of the target for the reported proxy
    top_percent: float = 10.0  # DataMIL / IWR / similarity: keep the top x% of the prior
    select_level: str = "episode"
    alpha: float = 0.5  # co-training: target probability
    train_steps: int = 1500
    batch_size: int = 256
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 1e-3
    prior: dict[str, Any] = field(default_factory=lambda: {"success_per_task": 8, "failed_per_task": 8,
                                                           "failed_max_steps": 150, "max_steps": 300})
    vae: dict[str, Any] = field(default_factory=lambda: {"train_steps": 1500})  # VAEConfig options of the BR / STRAP / IWR embedding
    datamodel: dict[str, Any] = field(default_factory=lambda: dict(DEMO_DATAMODEL))  # DatamodelConfig options
    address: str | None = None

    def __post_init__(self):
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"DemoConfig.methods: unknown {unknown}; known: {ALL_METHODS}")
        self.seeds = tuple(int(s) for s in self.seeds)
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.seeds or self.episodes < 1 or self.train_steps < 1:
            raise ValueError(f"DemoConfig: need seeds, episodes >= 1 and train_steps >= 1, got {self.seeds}, "
                             f"{self.episodes}, {self.train_steps}")
        if not 0 < self.top_percent <= 100 or not 0 <= self.alpha <= 1:
            raise ValueError(f"DemoConfig: top_percent in (0, 100] and alpha in [0, 1], got {self.top_percent}, "
                             f"{self.alpha}")

    @classmethod
    def full(cls, **overrides) -> DemoConfig:
        """The reference size of BENCHMARKS.md §1 (hours on 2 cores; meant for a cluster)."""
        from distcur.commands.datamodel import FULL_PRESET

        base = {"seeds": (0, 1, 2), "episodes": 50, **PROTOCOL_POLICY,
                "prior": {"success_per_task": 50, "failed_per_task": 50}, "datamodel": dict(FULL_PRESET)}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def prior_config(self) -> MetaWorldPriorConfig:
        return MetaWorldPriorConfig(target=self.target, **self.prior)


# -- stages -----------------------------------------------------------------------------------


def ingest(cfg: DemoConfig, store: Store) -> dict:
    """The MetaWorld prior and target, plus held-out target demos for the proxy."""
    from distcur.sources.metaworld import generate_metaworld

    prior_cfg = cfg.prior_config()
    info = generate_metaworld(prior_cfg, store, address=cfg.address, progress=False)
    write_heldout_target(store, prior_cfg, cfg.heldout_demos)
    return info


def write_heldout_target(store: Store, prior_cfg: MetaWorldPriorConfig, n: int) -> None:
    """``n`` fresh expert demos of the target, never trained on (their initial states come from
    episode indices after the training demos', so they differ from them)."""
    from distcur.sources.metaworld import EpisodeSpec, generate_chunk

    key = steps_key(heldout_source(prior_cfg.target))
    config = {**prior_cfg.target_config(), "heldout": n}
    if store.is_done(key, "ingest-heldout", config, {}):
        return
    specs = [EpisodeSpec(heldout_source(prior_cfg.target), i, prior_cfg.target, "target", prior_cfg.target_demos + i)
             for i in range(n)]
    table, _ = generate_chunk(prior_cfg, specs)
    store.write_table(key, table, "ingest-heldout", config)


def score_all(cfg: DemoConfig, store: Store) -> dict[str, str]:
    """Score and select with every method in ``cfg.methods``; {method: selection run or None}."""
    from distcur.distributed.embed import EmbedConfig, run_embed
    from distcur.distributed.score import score
    from distcur.select import SelectConfig, run_select

    selections: dict[str, str | None] = {}
    scorers = [m for m in cfg.methods if m in SCORERS]
    if any(m in ("br", "strap", "iwr") for m in scorers):
        run_embed(store, EmbedConfig(encoder="vae", encoder_options=dict(cfg.vae)), address=cfg.address)
    select_cfg = SelectConfig(top_percent=cfg.top_percent, level=cfg.select_level)
    for method in cfg.methods:
        run = f"{cfg.run}-{method}"
        t0 = time.time()
        if method in SCORERS:
            opts = {"seed": 0} if method == "random" else {}
            score(store, method, cfg.target, run, address=cfg.address, **opts)
        elif method in DATAMODELS:
            from distcur.commands.datamodel import make_config, run_datamodel

            dm_cfg = make_config(dict(cfg.datamodel), address=cfg.address)
            run_datamodel(store, method.split("-", 1)[1], cfg.target, run, dm_cfg)
        else:
            selections[method] = None if method == "target_only" else method
            continue
        run_select(store, run, run, select_cfg)
        selections[method] = run
        log.info("%s: scored and selected in %.1f s", method, time.time() - t0)
    return selections


def baseline_run(cfg: DemoConfig, store: Store, kind: str) -> str:
    """Commit the selection of a baseline (all data) under ``selections/<run>-<kind>``."""
    from distcur.policy.train import baseline_selection

    run = f"{cfg.run}-{kind}"
    table = baseline_selection(store, kind)
    store.write_table(selection_key(run), table, "select", {"baseline": kind}, {})
    return run


def train_and_evaluate(store_uri: str, cfg: DemoConfig, method: str, selection_run: str | None, seed: int) -> dict:
    """Co-train one policy on (target, selection) and measure success and held-out proxy loss.

    A plain function (the Ray task in :mod:`distcur.distributed.pipeline` only calls it)."""
    import torch

    from distcur.evaluate.metaworld import evaluate_success
    from distcur.evaluate.proxy import proxy_loss_on_source
    from distcur.policy.loaded import TrainedPolicy
    from distcur.policy.train import TrainConfig, load_training_data, read_selection, train_policy

    torch.set_num_threads(1)
    store = Store(store_uri)
    selection = read_selection(store, selection_run) if selection_run else None
    data = load_training_data(store, target_source(cfg.target), selection)
    tcfg = TrainConfig(hidden=cfg.hidden, lr=cfg.lr, batch_size=cfg.batch_size, steps=cfg.train_steps,
                       alpha=1.0 if selection is None else cfg.alpha, seed=seed, checkpoint_every=0)
    t0 = time.time()
    params, normalizer, history = train_policy(data, tcfg)
    train_s = time.time() - t0
    policy = TrainedPolicy(params, _spec(data, tcfg), normalizer)
    t0 = time.time()
    success = evaluate_success(policy, cfg.target, episodes=cfg.episodes, seeds=(seed,), max_steps=cfg.max_steps,
                               envs_per_worker=cfg.episodes, parallel=False)[0]
    proxy = proxy_loss_on_source(policy, store, heldout_source(cfg.target))
    return {"method": method, "task": cfg.target, "seed": seed, "episodes": success["episodes"],
            "success": success["success"], "proxy_loss": proxy, "selected_steps": int(data.n_prior),
            "train_s": round(train_s, 2), "eval_s": round(time.time() - t0, 2),
            "final_train_loss": history[-1]["loss"] if history else None}


def _spec(data, tcfg):
    from distcur.policy.functional import PolicySpec

    return PolicySpec(state_dim=data.obs.shape[1], action_dim=data.act.shape[1], hidden=tcfg.hidden)


RESULT_SCHEMA = pa.schema([
    ("method", pa.string()), ("task", pa.string()), ("seed", pa.int64()), ("episodes", pa.int64()),
    ("success", pa.float64()), ("proxy_loss", pa.float64()), ("selected_steps", pa.int64()),
    ("selected_fraction", pa.float64()), ("train_s", pa.float64()), ("eval_s", pa.float64()),
])


def job_key(run: str, method: str, seed: int) -> str:
    """Where one (method, seed) policy's result row is committed as soon as it is evaluated."""
    return f"{eval_key(run)}/jobs/{method}/seed={seed}"


def _train_evaluate_resumable(store: Store, cfg: DemoConfig, jobs: list[tuple[str, str | None, int]]) -> list[dict]:
    """Every job's row, training only the jobs without a committed row made from the same policy,
    rollout and selection settings: a run stopped after hours loses only the jobs in flight, and
    adding seeds or methods trains only those."""
    from distcur.distributed.pipeline import run_policy_jobs

    shared = {k: v for k, v in to_dict(cfg).items() if k not in ("store", "address", "methods", "seeds")}
    data_inputs = {"target": store.input_fingerprint(steps_key(target_source(cfg.target))),
                   "heldout": store.input_fingerprint(steps_key(heldout_source(cfg.target)))}
    selection_inputs = {run: store.input_fingerprint(selection_key(run)) for _, run, _ in jobs if run}

    def job_spec(job):
        method, run, seed = job
        inputs = {**data_inputs, "selection": selection_inputs[run]} if run else data_inputs
        return job_key(cfg.run, method, seed), {**shared, "method": method, "seed": seed}, inputs

    specs = {job: job_spec(job) for job in jobs}
    done = {job: store.read_table(s[0]).to_pylist()[0] for job, s in specs.items() if store.is_done(s[0], "demo-job", *s[1:])}
    todo = [job for job in jobs if job not in done]
    if done:
        log.info("train/evaluate: %d of %d (method, seed) jobs already committed, training %d", len(done), len(jobs),
                 len(todo))

    def commit(job, row):
        key, config, inputs = specs[job]
        store.write_table(key, pa.Table.from_pylist([row]), "demo-job", config, inputs)

    fresh = dict(zip(todo, run_policy_jobs(store.uri, cfg, todo, on_result=commit), strict=True)) if todo else {}
    return [done[job] if job in done else fresh[job] for job in jobs]


def run_demo(cfg: DemoConfig) -> pa.Table:
    """Run every stage; returns (and commits at ``evals/<run>``) one row per (method, seed)."""
    from distcur.distributed.session import ensure_ray

    t_start = time.time()
    store = Store(cfg.store)
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

    jobs = [(m, selections[m], s) for m in cfg.methods for s in cfg.seeds]
    key = eval_key(cfg.run)
    inputs = {r: store.input_fingerprint(selection_key(r)) for r in selections.values() if r}
    config = {k: v for k, v in to_dict(cfg).items() if k not in ("store", "address")}
    if store.is_done(key, "demo", config, inputs):
        table = store.read_table(key)
    else:
        t0 = time.time()
        rows = _train_evaluate_resumable(store, cfg, jobs)
        timings["train_evaluate"] = time.time() - t0
        for r in rows:
            r["selected_fraction"] = r["selected_steps"] / prior_steps if prior_steps else 0.0
        table = pa.Table.from_pylist([{k: r.get(k) for k in RESULT_SCHEMA.names} for r in rows], schema=RESULT_SCHEMA)
        timings["total"] = time.time() - t_start
        store.write_table(key, table, "demo", config, inputs, metadata={"timings_s": timings})
    return table


def quality_records(table: pa.Table, protocol: dict) -> dict:
    """The demo's results in the ``quality_metaworld.json`` layout of BENCHMARKS.md §1."""
    rows = table.to_pylist()
    return {"protocol": protocol,
            "results": [{k: r[k] for k in ("task", "method", "seed", "episodes", "success", "proxy_loss",
                                           "selected_fraction")} for r in rows]}


def merge_quality_json(path: str | os.PathLike, new: dict, drop_task_prefix: str | None = None) -> None:
    """Read-modify-write of ``quality_metaworld.json``, the one writer every run goes through.

    Replaces the records of (task, method, seed) present in ``new`` (and, with
    ``drop_task_prefix``, every record whose task starts with it) and keeps all others;
    ``new["protocol"]`` entries replace the protocol's entries of the same name."""
    try:
        with open(path) as f:
            current = json.load(f)
    except FileNotFoundError:
        current = {"protocol": {}, "results": []}
    keys = {(r["task"], r["method"], r["seed"]) for r in new["results"]}
    kept = [r for r in current.get("results", [])
            if (r["task"], r["method"], r["seed"]) not in keys
            and not (drop_task_prefix and str(r["task"]).startswith(drop_task_prefix))]
    protocol = dict(current.get("protocol", {}))
    protocol.update(new.get("protocol", {}))
    out = {**current, "protocol": protocol, "results": kept + new["results"]}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _datamodel_protocol(cfg: DemoConfig) -> dict:
    """The DataMIL methods' resolved settings (defaults included), without the runtime fields."""
    from distcur.commands.datamodel import make_config

    d = to_dict(make_config(dict(cfg.datamodel)))
    return {k: v for k, v in d.items() if k not in ("address", "max_retries", "estimator")}


def protocol_of(cfg: DemoConfig) -> dict:
    prior = dataclasses.asdict(cfg.prior_config())
    return {"prior": {k: prior[k] for k in ("tasks", "success_per_task", "failed_per_task", "target_demos",
                                            "success_noise", "failed_noise", "max_steps")},
            "policy": {"hidden": list(cfg.hidden), "train_steps": cfg.train_steps, "batch_size": cfg.batch_size,
                       "alpha": cfg.alpha}, "selection": {"top_percent": cfg.top_percent, "level": cfg.select_level},
            "evaluation": {"episodes": cfg.episodes, "max_steps": cfg.max_steps, "seeds": list(cfg.seeds),
                           "proxy": f"BC NLL on {cfg.heldout_demos} held-out expert demos"},
            "datamodel": _datamodel_protocol(cfg),
            "config_fingerprint": fingerprint(to_dict(cfg))}
