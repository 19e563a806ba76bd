"""The datamodel stage's two executors (no domain code: they run the callables they are handed).

Both run a list of work items (a batch of stacked subset models, a meta-gradient iteration) whose
``work`` commits its own output, so a rerun does only the items whose done bit is missing:

* :class:`RayTasks` (``executor: ray-tasks``): one Ray task per item (``max_retries`` each, 1
  CPU); the failed items are returned after every other one has finished;
* :class:`RayTrain` (``executor: ray-train``): ONE ``TorchTrainer`` for a whole plan of rounds
  (:func:`distcur.distributed.raytrain.fit_plan`): ``FailureConfig`` restarts a lost worker and
  the restarted group skips every item already done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distcur.distributed.raytrain import RayTrainSettings, WorkPlan, fit_plan

log = logging.getLogger(__name__)


def map_tasks(fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None, address: str | None = None,
              max_retries: int = 1, num_cpus: float = 1, progress: Callable[[], None] | None = None
              ) -> dict[Any, str]:
    """``fn(item, shared)`` as one Ray task per item (``shared`` put in the object store once);
    returns {item: error} of the items whose task failed after its retries (a lost worker, an
    exception), once every task has finished. ``progress()`` is called as each one finishes."""
    import ray

    from distcur.distributed.session import ensure_ray

    ensure_ray(address)
    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    shared_ref = ray.put(shared)
    futures = {remote.remote(item, shared_ref): item for item in items}
    failed: dict[Any, str] = {}
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready[0])
        except (ray.exceptions.RayError, OSError) as e:
            failed[futures[ready[0]]] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if progress is not None:
            progress()
    return failed


@dataclass
class RayTasks:
    """Work items as Ray tasks (:func:`map_tasks`)."""

    address: str | None = None
    max_retries: int = 1
    kind: str = field(default="ray-tasks", init=False)

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None,
            progress: Callable[[], None] | None = None) -> dict[Any, str]:
        return map_tasks(fn, items, shared, self.address, self.max_retries, progress=progress)


@dataclass
class RayTrain:
    """A plan of work items on one TorchTrainer (:func:`~distcur.distributed.raytrain.fit_plan`)."""

    settings: RayTrainSettings = field(default_factory=RayTrainSettings)
    address: str | None = None
    kind: str = field(default="ray-train", init=False)

    def run(self, make_plan: Callable[[Any, Any], WorkPlan], payload: Any, storage: str, name: str,
            progress: Callable[[], None] | None = None, fault_marker: str | None = None) -> None:
        fit_plan(make_plan, payload, self.settings, storage, name, progress, fault_marker, self.address)
