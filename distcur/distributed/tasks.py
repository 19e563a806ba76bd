"""Plain Ray tasks: the one task executor every stage hands its independent work to.

It knows nothing of what the work is: a stage gives it a callable and one argument tuple per
call (prior generation chunks, batched rollouts, scoring parts, subset-model batches, the demo's
policy jobs) and gets back the results. One interface, four ways to wait:

* :meth:`RayTasks.map` -- every result, in order (the first failure raised);
* :meth:`RayTasks.each` -- each result handed to ``on_result`` as it arrives (to commit it at
  once, so a stopped run keeps what finished), optionally one log line per result, and with
  ``keep_going`` a failed call's exception in its place instead of raised, after every other
  call has finished (a stage that resumes per item redoes only those);
* :meth:`RayTasks.submit` / :meth:`RayTasks.get` -- object references, for rounds whose outputs
  feed the next round's tasks without passing through the driver;
* calling it, ``executor(fn, items)``: ``[fn(item) for item in items]``, the single-argument
  executor protocol of the source readers and the rollouts (:func:`distcur.sources.common.map_sequential`
  is the in-process one).

Ray is joined or started on first use (:func:`distcur.distributed.session.ensure_ray`), never for
an output that is already current. The callable is put in the object store once (a policy it
carries travels once, not per task). An exception of one of the ``errors`` types raised inside a
task is raised on the driver as itself (a user's bad input stays one clear line). ``max_retries``
retries a task whose worker died (Ray's meaning: not an exception the task raised).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from distcur import progress as progress_lib
from distcur.distributed.session import ensure_ray

log = logging.getLogger(__name__)


def _apply(fn: Callable, *args: Any) -> Any:
    """``fn(*args)``: the one remote function every callable handed in runs through (a partial included)."""
    return fn(*args)


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "task")


def _surfaced(e: BaseException, errors: tuple[type, ...]) -> BaseException:
    """What a failed task raises on the driver: the task's own exception when it is one of the
    ``errors`` types (a user's bad input, one clear line), else Ray's error as it is."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, errors) else e


def _failure(e: BaseException) -> str:
    """A failed task in one line: the exception's type and the first line of its message (for a
    task's own exception, Ray's wrapper names only the task: its cause is described instead)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class RayTasks:
    """Callables as Ray tasks of ``num_cpus`` each on the Ray at ``address`` (default: RAY_ADDRESS
    or a local Ray); see the module docstring for the ways to wait."""

    kind = "ray-tasks"

    def __init__(self, address: str | None = None, *, num_cpus: float = 1.0, max_retries: int = 3,
                 progress: bool = False, label: str = "tasks", unit: str = "task",
                 errors: Iterable[type] = (ValueError,)):
        self.address, self.num_cpus, self.max_retries = address, num_cpus, max_retries
        self.progress, self.label, self.unit, self.errors = progress, label, unit, tuple(errors)
        self._remotes: dict[tuple[str, int], Any] = {}

    def start(self) -> None:
        """Join or start Ray (only when there is work: a current output never starts it)."""
        ensure_ray(self.address)

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def _remote(self, fn: Callable, num_returns: int = 1):
        import ray

        key = (_name(fn), num_returns)
        if key not in self._remotes:  # one remote function per (name, returns), not one per call
            self._remotes[key] = ray.remote(_apply).options(num_cpus=self.num_cpus, num_returns=num_returns,
                                                            name=key[0], max_retries=self.max_retries)
        return self._remotes[key]

    def submit(self, fn: Callable, *args: Any, num_returns: int = 1) -> Any:
        """``fn(*args)`` as one task: its object reference (a tuple of ``num_returns`` of them).
        Object references among ``args`` reach the task as their values."""
        self.start()
        return self._remote(fn, num_returns).remote(fn, *args)

    def get(self, refs: Any) -> Any:
        """The values of ``refs``; a task's exception of an ``errors`` type is raised as itself."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            user = _surfaced(e, self.errors)
            if user is e:
                raise
            raise user from None

    def _launch(self, fn: Callable, calls: Sequence[tuple]) -> list:
        self.start()
        fn_ref = self.put(fn)
        remote = self._remote(fn)
        return [remote.remote(fn_ref, *call) for call in calls]

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        """``[fn(*call) for call in calls]``, one task each, results in order (a bar where
        ``progress`` and bars are drawn)."""
        return self.each(fn, calls)

    def __call__(self, fn: Callable, items: Sequence[Any]) -> list:
        """``[fn(item) for item in items]``: the single-argument executor protocol."""
        return self.map(fn, [(item,) for item in items])

    def each(self, fn: Callable, calls: Sequence[tuple], on_result: Callable[[int, Any], None] | None = None,
             describe: Callable[[Any], tuple[str, str]] | None = None, keep_going: bool = False) -> list:
        """``fn(*call)`` for every call, each result handed to ``on_result(i, result)`` as it arrives;
        the results in order. ``describe(result) -> (log line, bar postfix)`` logs one line per
        result. With ``keep_going``, a call whose task failed (after its retries) has its exception
        in its place, and ``on_result`` is not called for it."""
        if not calls:
            return []
        refs = self._launch(fn, calls)
        return wait(refs, on_result, describe, keep_going=keep_going, errors=self.errors,
                    label=self.label, unit=self.unit, show=self.progress or describe is not None)


def wait(refs: list, on_result: Callable[[int, Any], None] | None = None,
         describe: Callable[[Any], tuple[str, str]] | None = None, keep_going: bool = False,
         errors: tuple[type, ...] = (ValueError,), label: str = "tasks", unit: str = "task", show: bool = True) -> list:
    """The values of ``refs`` in order, each handed to ``on_result(i, value)`` as it finishes.

    Where a bar is drawn (a terminal; ``show``) the tasks are one bar, done / total with the
    latest ``describe`` postfix, redrawn every few seconds while tasks run; each described result
    is then logged at DEBUG (shown with ``-v``). Without a bar (logs, CI) each described result is
    its own INFO line, ``[done/total] line``, as the bar would not be there to show it."""
    import ray

    results: list = [None] * len(refs)
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    with progress_lib.bar(total=len(refs), desc=label, unit=unit, disable=not show) as shown:
        on_bar = not shown.disable
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            try:
                results[i] = r = ray.get(done[0])
            except (ray.exceptions.RayError, OSError) as e:  # the task's own error, a lost worker, I/O
                err = _surfaced(e, errors)
                if not keep_going:
                    if err is e:
                        raise
                    raise err from None
                results[i] = err
                log.warning("task %d of %d failed: %s", i + 1, len(refs), _failure(err))
                shown.update()
                continue
            if on_result is not None:
                on_result(i, r)
            if describe is not None:
                line, postfix = describe(r)
                log.log(logging.DEBUG if on_bar else logging.INFO, "[%d/%d] %s", len(refs) - len(pending), len(refs),
                        line)
                shown.set_postfix_str(postfix, refresh=False)
            shown.update()
    return results


def failures(results: Sequence[Any]) -> dict[int, str]:
    """{index: one-line error} of the calls of :meth:`RayTasks.each` (``keep_going``) that failed."""
    return {i: _failure(r) for i, r in enumerate(results) if isinstance(r, BaseException)}
