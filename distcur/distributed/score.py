"""Plain Ray tasks: the executor the score stage hands its per-part work to.

The stage (:mod:`distcur.stages.score`) decides what runs; this module only submits callables as
Ray tasks (1 CPU each unless told), shares large arguments through the object store and waits.
Results stay object references until :meth:`RayTasks.get`, so one round's outputs feed the next
round's tasks without passing through the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from distcur.distributed.session import ensure_ray


def _apply(fn: Callable, *args: Any) -> Any:
    """``fn(*args)``: the one remote function every callable handed in runs through (a partial included)."""
    return fn(*args)


class RayTasks:
    """Submit callables as Ray tasks on the Ray at ``address`` (default: RAY_ADDRESS or a local Ray)."""

    def __init__(self, address: str | None = None, num_cpus: float = 1.0):
        self.address, self.num_cpus = address, num_cpus

    def start(self) -> None:
        """Join or start Ray (only when there is work: a current output never starts it)."""
        ensure_ray(self.address)

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def submit(self, fn: Callable, *args: Any, num_returns: int = 1) -> Any:
        """``fn(*args)`` as one task: its object reference (a tuple of ``num_returns`` of them)."""
        import ray

        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "task")
        return ray.remote(_apply).options(num_cpus=self.num_cpus, num_returns=num_returns, name=name).remote(fn, *args)

    def get(self, refs: Any) -> Any:
        import ray

        return ray.get(refs)

    def map(self, fn: Callable, items: Sequence[tuple]) -> list:
        """``[fn(*args) for args in items]``, one task each, results in order."""
        return self.get([self.submit(fn, *args) for args in items])
