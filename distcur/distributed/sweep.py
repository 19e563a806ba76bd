"""``distcur sweep``: Ray Tune over scorer method, KDE bandwidth, top-x% and co-training alpha.

The expensive, shared inputs of the trials (scores per (method, bandwidth), selections per
(score, top-x%)) are computed once by the driver through the same stage functions as the CLI
(each skipped when its manifest matches); a trial only co-trains a policy on its selection and
reports the objective:

* ``proxy``  — BC loss on held-out target demos, reported every ``report_every`` training steps,
  so ASHA stops the unpromising trials early;
* ``success`` — MetaWorld success rate after training (one report per trial: no early stopping).

Tune's experiment state lives under ``sweeps/<run>/tune`` in the store (local or S3), so an
interrupted sweep resumes with ``Tuner.restore``; the results table is committed at
``sweeps/<run>`` as Parquet with a manifest like every stage.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import pyarrow as pa

from distcur.config import to_dict
from distcur.data import target_source
from distcur.methods import names, parse_bandwidth
from distcur.progress import bar
from distcur.store import Store, fingerprint

log = logging.getLogger(__name__)

OBJECTIVES = {"proxy": ("proxy_loss", "min"), "success": ("success", "max")}
SWEEP_SCORERS = names("scorer")


@dataclass
class SweepConfig:
    store: str
    target: str = "pick-place-wall-v3"
    run: str = "sweep"
    methods: tuple[str, ...] = ("br", "iwr")
    bandwidths: tuple[str | float, ...] = ("scott",)  # IWR only
    top_percents: tuple[float, ...] = (5.0, 10.0, 20.0)
    alphas: tuple[float, ...] = (0.3, 0.5, 0.7)
    level: str = "episode"
    objective: str = "proxy"
    heldout_source: str | None = None  # default: target-<task>-heldout when present, else the target
    train_steps: int = 1000
    report_every: int = 100
    hidden: tuple[int, ...] = (256, 256)
    batch_size: int = 256
    episodes: int = 10  # objective "success" only
    max_steps: int = 300
    seed: int = 0
    max_concurrent: int = 2
    grace_period: int = 3  # ASHA: reports before a trial may be stopped
    address: str | None = None

    def __post_init__(self):
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in SWEEP_SCORERS]
        if bad or not self.methods:
            raise ValueError(f"SweepConfig.methods: unknown {bad or '()'}; choose from {SWEEP_SCORERS}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"SweepConfig.objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        self.bandwidths = tuple(parse_bandwidth(b) for b in self.bandwidths)  # "0.3" -> 0.3; a bad one fails here
        self.top_percents = tuple(float(x) for x in self.top_percents)
        self.alphas = tuple(float(a) for a in self.alphas)
        self.hidden = tuple(int(h) for h in self.hidden)
        if any(not 0 < x <= 100 for x in self.top_percents) or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"SweepConfig: top_percents in (0, 100] and alphas in [0, 1], got "
                             f"{self.top_percents}, {self.alphas}")
        if self.train_steps < self.report_every or self.report_every < 1:
            raise ValueError(f"SweepConfig: need 1 <= report_every <= train_steps, got {self.report_every}, "
                             f"{self.train_steps}")


def _score_run(cfg: SweepConfig, method: str, bandwidth) -> str:
    return f"{cfg.run}-{method}" + (f"-bw{bandwidth}" if method == "iwr" else "")


def prepare_selections(cfg: SweepConfig, store: Store) -> list[dict]:
    """Score and select for every (method, bandwidth, top-x%); the grid points of the sweep."""
    from distcur.distributed.score import score
    from distcur.select import SelectConfig, run_select

    points = []
    for method in cfg.methods:
        for bw in cfg.bandwidths if method == "iwr" else (None,):
            score_run = _score_run(cfg, method, bw)
            opts = {"bandwidth": bw} if method == "iwr" else {}
            score(store, method, cfg.target, score_run, address=cfg.address, **opts)
            for top in cfg.top_percents:
                sel_run = f"{score_run}-top{top:g}"
                run_select(store, score_run, sel_run, SelectConfig(top_percent=top, level=cfg.level))
                points.append({"method": method, "bandwidth": bw, "top_percent": top, "selection": sel_run})
    return points


def _trial(config: dict) -> None:
    """One Tune trial: co-train on the trial's selection, report the objective."""
    import torch
    from ray import tune

    from distcur.evaluate.proxy import load_heldout
    from distcur.policy import checkpoint as ckpt
    from distcur.policy.loaded import TrainedPolicy
    from distcur.policy.proxy import policy_proxy
    from distcur.policy.train import TrainConfig, load_training_data, read_selection, train_policy

    torch.set_num_threads(1)
    cfg: SweepConfig = config["sweep"]
    store = Store(cfg.store)
    data = load_training_data(store, target_source(cfg.target), read_selection(store, config["selection"]))
    heldout = load_heldout(store, config["heldout"])
    tcfg = TrainConfig(hidden=cfg.hidden, batch_size=cfg.batch_size, steps=cfg.train_steps, alpha=config["alpha"],
                       seed=cfg.seed, checkpoint_every=cfg.report_every)
    spec = data.policy_spec(tcfg.hidden)

    def report_proxy(state: dict) -> None:
        params, _, normalizer = ckpt.unpack(state)
        loss = policy_proxy(TrainedPolicy(params, spec, normalizer), heldout.state, heldout.action)
        tune.report({"proxy_loss": loss, "step": int(state["step"])})

    params, normalizer, _ = train_policy(data, tcfg, checkpoint_fn=report_proxy if cfg.objective == "proxy" else None)
    if cfg.objective == "success":
        from distcur.envs.rollouts import evaluate_success

        policy = TrainedPolicy(params, spec, normalizer)
        res = evaluate_success(policy, cfg.target, episodes=cfg.episodes, seeds=(cfg.seed,), max_steps=cfg.max_steps,
                               envs_per_worker=cfg.episodes)[0]
        loss = policy_proxy(policy, heldout.state, heldout.action)
        tune.report({"success": float(res["success"]), "proxy_loss": loss, "step": cfg.train_steps,
                     "selected_steps": int(data.n_prior)})


def run_sweep(cfg: SweepConfig) -> pa.Table:
    """Run (or resume) the sweep; returns and commits the results table at ``sweeps/<run>``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from distcur.distributed.session import ensure_ray

    store = Store(cfg.store)
    key = f"sweeps/{cfg.run}"
    config = {k: v for k, v in to_dict(cfg).items() if k not in ("store", "address", "max_concurrent")}
    ensure_ray(cfg.address)
    points = prepare_selections(cfg, store)
    inputs = {p["selection"]: store.input_fingerprint(f"selections/{p['selection']}") for p in points}
    if store.is_done(key, "sweep", config, inputs):
        return store.read_table(key)
    heldout = cfg.heldout_source or _default_heldout(store, cfg.target)
    grid = [{**p, "alpha": a} for p, a in itertools.product(points, cfg.alphas)]
    param_space = {"point": tune.grid_search(grid), "sweep": cfg, "heldout": heldout}
    metric, mode = OBJECTIVES[cfg.objective]
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.train_steps // cfg.report_every,
                               grace_period=cfg.grace_period, reduction_factor=2)
                 if cfg.objective == "proxy" else FIFOScheduler())

    def trainable(c):
        _trial({**c["point"], "sweep": c["sweep"], "heldout": c["heldout"]})

    trainable = tune.with_resources(trainable, {"cpu": 1})
    tune_dir = store.path(f"{key}/tune")
    experiment = f"{cfg.run}-{fingerprint({'config': config, 'inputs': inputs})[:8]}"
    path = f"{tune_dir}/{experiment}"
    t0 = time.time()
    trials_bar = bar(total=len(grid), desc=f"sweep {cfg.run} trials", unit="trial")

    class TrialBar(tune.Callback):
        """Tune's trial events as a distcur bar (Tune's own table reporter prints pages of lines).
        Tune saves its run config with the experiment: the bar itself is not saved with it."""

        def __init__(self, progress):
            self.progress = progress

        def __getstate__(self):
            return {}

        def __setstate__(self, state):
            self.progress = None

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.progress is not None:
                self.progress.update()

        on_trial_error = on_trial_complete

    if tune.Tuner.can_restore(path, storage_filesystem=store.fs):
        log.info("sweep %s: resuming the Tune experiment at %s", cfg.run, path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=store.fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                        max_concurrent_trials=cfg.max_concurrent),
            run_config=tune.RunConfig(name=experiment, storage_path=tune_dir, storage_filesystem=store.fs,
                                      verbose=0, callbacks=[TrialBar(trials_bar)]),
        )
    with trials_bar:
        grid_results = tuner.fit()
    rows = []
    for result in grid_results:
        if result.error is not None:
            raise RuntimeError(f"sweep {cfg.run}: trial {result.path} failed: {result.error}")
        point = result.config["point"]
        df = result.metrics_dataframe
        rows.append({
            "method": point["method"], "bandwidth": None if point["bandwidth"] is None else str(point["bandwidth"]),
            "top_percent": point["top_percent"], "alpha": point["alpha"], "selection": point["selection"],
            "proxy_loss": float(result.metrics["proxy_loss"]),
            "best_proxy_loss": float(df["proxy_loss"].min()) if df is not None and "proxy_loss" in df else None,
            "success": float(result.metrics["success"]) if "success" in result.metrics else None,  # None: not measured
            "steps_trained": int(result.metrics.get("step", 0)),
            "stopped_early": int(result.metrics.get("step", 0)) < cfg.train_steps,
        })
    table = pa.Table.from_pylist(rows)
    store.write_table(key, table, "sweep", config, inputs,
                      metadata={"metric": metric, "mode": mode, "trials": len(rows), "tune_path": path,
                                "wall_s": round(time.time() - t0, 2)})
    return table


def _default_heldout(store: Store, task: str) -> str:
    from distcur.data import heldout_source, steps_key

    return heldout_source(task) if store.manifest(steps_key(heldout_source(task))) else target_source(task)
