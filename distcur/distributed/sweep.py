"""Ray Tune executor: a grid of trials, each a callable handed in, with ASHA early stopping.

The sweep stage (:mod:`distcur.stages.sweep`) decides what a trial does; this module runs
``trial(point, report)`` once per grid point as a Tune trial (``report(metrics)`` is
``ray.tune.report``), with ASHA on ``metric`` when asked (else FIFO), at most ``max_concurrent``
at a time. The experiment state lives under ``storage_path`` on ``filesystem`` (local or S3), so
an interrupted grid resumes with ``Tuner.restore`` (errored trials rerun).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distcur.distributed.session import ensure_ray
from distcur.progress import bar

log = logging.getLogger(__name__)


@dataclass
class TrialResult:
    """One trial: its grid ``point``, last reported ``metrics``, every report (``history``, a
    DataFrame or None) and where Tune kept it."""

    point: dict
    metrics: dict
    history: Any
    path: str


@dataclass
class Asha:
    """ASHA over ``time_attr`` (reports): trials stop early from ``grace_period`` reports on, up to ``max_t``."""

    max_t: int
    grace_period: int
    reduction_factor: int = 2
    time_attr: str = "training_iteration"


def _run_point(trial: Callable, c: dict) -> None:
    from ray import tune

    trial({**c["point"], **c["shared"]}, tune.report)


def run_grid(trial: Callable[[dict, Callable[[dict], None]], None], grid: list[dict], shared: dict, *, metric: str,
             mode: str, storage_path: str, name: str, filesystem: Any = None, asha: Asha | None = None,
             max_concurrent: int = 2, cpus_per_trial: float = 1.0, address: str | None = None,
             desc: str = "trials") -> list[TrialResult]:
    """Run ``trial({**point, **shared}, report)`` for every ``point`` of ``grid`` on Ray Tune; the
    results in Tune's order. A trial that failed is an error naming it."""
    import functools

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    ensure_ray(address)
    param_space = {"point": tune.grid_search(grid), "shared": shared}
    scheduler = (ASHAScheduler(time_attr=asha.time_attr, max_t=asha.max_t, grace_period=asha.grace_period,
                               reduction_factor=asha.reduction_factor) if asha is not None else FIFOScheduler())
    trainable = tune.with_resources(functools.partial(_run_point, trial), {"cpu": cpus_per_trial})
    path = f"{storage_path}/{name}"
    trials_bar = bar(total=len(grid), desc=desc, unit="trial")

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

    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        log.info("%s: resuming the Tune experiment at %s", name, path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                      verbose=0, callbacks=[TrialBar(trials_bar)]),
        )
    with trials_bar:
        grid_results = tuner.fit()
    out = []
    for result in grid_results:
        if result.error is not None:
            raise RuntimeError(f"{name}: trial {result.path} failed: {result.error}")
        out.append(TrialResult(result.config["point"], dict(result.metrics), result.metrics_dataframe, result.path))
    return out
