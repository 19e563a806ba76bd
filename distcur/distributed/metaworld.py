"""Ray tasks as an executor: a callable mapped over items, one task (1 CPU) per item, results in
order, with a progress bar as they finish.

The MetaWorld stage hands it prior generation jobs (:func:`distcur.sources.metaworld.generate_chunk`
over (task x chunk)); evaluation hands it batched rollouts
(:func:`distcur.envs.rollouts.rollout_batch` per (seed, episodes)). This module knows neither: it
runs the callable it is given. Ray worker processes are reused, so each keeps one pool of
environments per task (built on first use).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ray

from distcur.distributed.session import ensure_ray
from distcur.progress import bar


def _gather(refs: list, show: bool, label: str) -> list:
    """Results of ``refs`` in order, with a progress bar on stderr as they finish (where bars are
    drawn at all: :func:`distcur.progress.enabled`)."""
    if not show:
        return ray.get(refs)
    pending = list(refs)
    with bar(total=len(refs), desc=label, unit="task") as shown:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            shown.update(len(done))
    return ray.get(refs)


@ray.remote(num_cpus=1)
def _call(fn: Callable, item: Any) -> Any:
    return fn(item)


class RayTasks:
    """``executor(fn, items) -> [fn(item), ...]`` as Ray tasks of ``num_cpus`` each, in order.

    ``fn`` is put in Ray's object store once (a policy it carries travels once, not per task).
    Joins ``address`` (or ``RAY_ADDRESS``) or starts a local Ray on first use, so a caller can
    set the workers' environment (e.g. ``MUJOCO_GL``) before then. An exception of one of the
    ``errors`` types raised in a task is raised here as itself (a user's bad config, one line)."""

    def __init__(self, address: str | None = None, progress: bool = True, label: str = "tasks",
                 num_cpus: float = 1, errors: Iterable[type] = (ValueError,)):
        self.address, self.progress, self.label, self.num_cpus = address, progress, label, num_cpus
        self.errors = tuple(errors)

    def __call__(self, fn: Callable, items: Sequence[Any]) -> list:
        ensure_ray(self.address)
        fn_ref = ray.put(fn)
        remote = _call.options(num_cpus=self.num_cpus)
        refs = [remote.remote(fn_ref, item) for item in items]
        try:
            return _gather(refs, self.progress, self.label)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, self.errors):
                raise cause from None
            raise
