"""The sweep stage: Ray Tune over scorer method, KDE bandwidth, top-x% and co-training alpha.

The expensive, shared inputs of the trials (scores per (method, bandwidth), selections per
(score, top-x%)) are computed once by the driver through the score and select stages (each
skipped when its manifest matches); a trial only co-trains a policy on its selection and reports
the objective:

* ``proxy``  — BC loss on held-out target demos, reported every ``report_every`` training steps,
  so ASHA stops the unpromising trials early;
* ``success`` — MetaWorld success rate after training (one report per trial: no early stopping).

Each trial trains with ``train`` (:class:`distcur.policy.train.TrainConfig`; the sweep's defaults:
2 x 256 hidden units, 1000 steps), its ``alpha`` the trial's and ``checkpoint_every`` = ``report_every``. Tune's experiment state lives under
``sweeps/<run>/tune`` in the store (local or S3), so an interrupted sweep resumes with
``Tuner.restore`` (:mod:`distcur.distributed.sweep`); the results table is committed at
``sweeps/<run>`` as Parquet with a manifest like every stage.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from distcur.config import DEFAULT_STORE, to_dict
from distcur.data import heldout_source, steps_key, sweep_key, target_source
from distcur.methods import names, parse_bandwidth
from distcur.policy.train import TrainConfig
from distcur.stages.output import commit_table
from distcur.store import Store, fingerprint

OBJECTIVES = {"proxy": ("proxy_loss", "min"), "success": ("success", "max")}
SWEEP_SCORERS = names("scorer")
# set per trial, never by the user: the trial's alpha, a checkpoint (a proxy report) every report_every steps
PER_TRIAL = ("alpha", "checkpoint_every")


def _sweep_train() -> TrainConfig:
    """The sweep's policy: smaller and shorter-trained than TrainConfig's default (a config or flag that
    sets some of its options keeps these for the rest)."""
    return TrainConfig(hidden=(256, 256), steps=1000)


@dataclass
class SweepConfig:
    store: str = field(default=DEFAULT_STORE, metadata={"help": "store URI with the prior, target and embeddings"})
    target: str = field(default="pick-place-wall-v3", metadata={"help": "target task"})
    run: str = field(default="sweep", metadata={"help": "sweep name: results at sweeps/<run>"})
    methods: tuple[str, ...] = field(default=("br", "iwr"), metadata={
        "help": f"scorers to sweep: {', '.join(SWEEP_SCORERS)}", "choices": SWEEP_SCORERS})
    bandwidths: tuple[str | float, ...] = field(default=("scott",), metadata={
        "help": "IWR KDE bandwidths: scott, silverman, likelihood or a number"})
    top_percents: tuple[float, ...] = field(default=(5.0, 10.0, 20.0), metadata={"help": "top-x%% values"})
    alphas: tuple[float, ...] = field(default=(0.3, 0.5, 0.7), metadata={
        "help": "co-training target probabilities"})
    level: str = "episode"
    objective: str = field(default="proxy", metadata={
        "help": "proxy: held-out target BC loss with ASHA early stopping; success: MetaWorld rollouts",
        "choices": tuple(OBJECTIVES)})
    heldout_source: str | None = None  # default: target-<task>-heldout when present, else the target
    report_every: int = field(default=100, metadata={"help": "training steps between proxy reports"})
    episodes: int = 10  # objective "success" only
    max_steps: int = 300
    max_concurrent: int = field(default=2, metadata={"help": "trials at a time"})
    grace_period: int = 3  # ASHA: reports before a trial may be stopped
    address: str | None = field(default=None, metadata={"help": "Ray address (default: local Ray or RAY_ADDRESS)"})
    train: TrainConfig = field(default_factory=_sweep_train)

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
        if any(not 0 < x <= 100 for x in self.top_percents) or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"SweepConfig: top_percents in (0, 100] and alphas in [0, 1], got "
                             f"{self.top_percents}, {self.alphas}")
        if self.train.steps < self.report_every or self.report_every < 1:
            raise ValueError(f"SweepConfig: need 1 <= report_every <= train.steps, got {self.report_every}, "
                             f"{self.train.steps}")

    def manifest_config(self) -> dict:
        """The sweep's fingerprint: its options but where it runs, the training options it always had
        flat (``train_steps``, ``hidden``, ``batch_size``, ``seed``) and, under ``train``, any other
        training option that differs from what earlier sweeps trained with (so their outputs stay current)."""
        flat = {k: v for k, v in to_dict(self).items() if k not in ("store", "address", "max_concurrent", "train")}
        flat.update(train_steps=self.train.steps, hidden=self.train.hidden, batch_size=self.train.batch_size,
                    seed=self.train.seed)
        before, now = to_dict(TrainConfig()), to_dict(self.train)
        extra = {k: v for k, v in now.items() if k not in (*PER_TRIAL, "steps", "hidden", "batch_size", "seed", "device")
                 and v != before[k]}
        return {**flat, **({"train": extra} if extra else {})}


def _score_run(cfg: SweepConfig, method: str, bandwidth) -> str:
    return f"{cfg.run}-{method}" + (f"-bw{bandwidth}" if method == "iwr" else "")


def prepare_selections(cfg: SweepConfig, store: Store) -> list[dict]:
    """Score and select for every (method, bandwidth, top-x%); the grid points of the sweep."""
    from distcur.select import SelectConfig
    from distcur.stages import score, select

    points = []
    for method in cfg.methods:
        for bw in cfg.bandwidths if method == "iwr" else (None,):
            score_run = _score_run(cfg, method, bw)
            scorer = {"bandwidth": bw} if method == "iwr" else {}
            score.run(store, score.ScoreConfig(method=method, target=cfg.target, run=score_run, scorer=scorer),
                      address=cfg.address)
            for top in cfg.top_percents:
                sel_run = f"{score_run}-top{top:g}"
                select.select(store, score_run, sel_run, SelectConfig(top_percent=top, level=cfg.level))
                points.append({"method": method, "bandwidth": bw, "top_percent": top, "selection": sel_run})
    return points


def _trial(config: dict, report) -> None:
    """One Tune trial: co-train on the trial's selection and report the objective (``report``: Tune's),
    through the one train-then-evaluate (:func:`distcur.stages.evaluate.train_and_evaluate`): the proxy
    at every ``report_every`` steps (objective ``proxy``, no rollouts), or the rollouts' success at the end."""
    import torch

    from distcur.stages.evaluate import train_and_evaluate

    torch.set_num_threads(1)
    cfg: SweepConfig = config["sweep"]
    train = dataclasses.replace(cfg.train, alpha=config["alpha"], checkpoint_every=cfg.report_every)
    by_proxy = cfg.objective == "proxy"
    row = train_and_evaluate(cfg.store, cfg.target, config["selection"], train, config["selection"],
                             episodes=0 if by_proxy else cfg.episodes, max_steps=cfg.max_steps,
                             proxy_source=config["heldout"],
                             on_checkpoint=(lambda step, loss: report({"proxy_loss": loss, "step": step}))
                             if by_proxy else None)
    if not by_proxy:
        report({"success": float(row["success"]), "proxy_loss": row["proxy_loss"], "step": train.steps,
                "selected_steps": row["selected_steps"]})


def run(cfg: SweepConfig, executor: Any = None) -> pa.Table:
    """Run (or resume) the sweep; returns and commits the results table at ``sweeps/<run>``.

    ``executor``: a grid runner with :func:`distcur.distributed.sweep.run_grid`'s signature (the default)."""
    from distcur.distributed.session import ensure_ray
    from distcur.distributed.sweep import Asha, run_grid

    run_trials = executor or run_grid
    store = Store(cfg.store)
    key = sweep_key(cfg.run)
    config = cfg.manifest_config()
    ensure_ray(cfg.address)
    points = prepare_selections(cfg, store)
    inputs = {p["selection"]: store.input_fingerprint(f"selections/{p['selection']}") for p in points}
    steps = cfg.train.steps

    def make() -> tuple[pa.Table, dict]:
        heldout = cfg.heldout_source or _default_heldout(store, cfg.target)
        grid = [{**p, "alpha": a} for p, a in itertools.product(points, cfg.alphas)]
        metric, mode = OBJECTIVES[cfg.objective]
        asha = (Asha(max_t=steps // cfg.report_every, grace_period=cfg.grace_period)
                if cfg.objective == "proxy" else None)
        experiment = f"{cfg.run}-{fingerprint({'config': config, 'inputs': inputs})[:8]}"
        tune_dir = store.path(f"{key}/tune")
        t0 = time.time()
        trials = run_trials(_trial, grid, {"sweep": cfg, "heldout": heldout}, metric=metric, mode=mode,
                            storage_path=tune_dir, name=experiment, filesystem=store.fs, asha=asha,
                            max_concurrent=cfg.max_concurrent, address=cfg.address, desc=f"sweep {cfg.run} trials")
        rows = []
        for t in trials:
            point, metrics, df = t.point, t.metrics, t.history
            rows.append({
                "method": point["method"], "bandwidth": None if point["bandwidth"] is None else str(point["bandwidth"]),
                "top_percent": point["top_percent"], "alpha": point["alpha"], "selection": point["selection"],
                "proxy_loss": float(metrics["proxy_loss"]),
                "best_proxy_loss": float(df["proxy_loss"].min()) if df is not None and "proxy_loss" in df else None,
                "success": float(metrics["success"]) if "success" in metrics else None,  # None: not measured
                "steps_trained": int(metrics.get("step", 0)),
                "stopped_early": int(metrics.get("step", 0)) < steps,
            })
        return pa.Table.from_pylist(rows), {"metric": metric, "mode": mode, "trials": len(rows),
                                            "tune_path": f"{tune_dir}/{experiment}",
                                            "wall_s": round(time.time() - t0, 2)}

    commit_table(store, key, "sweep", config, inputs, make, quiet=True)
    return store.read_table(key)


def _default_heldout(store: Store, task: str) -> str:
    return heldout_source(task) if store.manifest(steps_key(heldout_source(task))) else target_source(task)
