"""Ray tasks for a list of independent jobs (the demo's policies): run, wait, hand each result back.

The executor knows nothing of what a job does: the stage gives it the function, one argument tuple
per job, what to do with each result as it arrives (commit it) and how to describe it in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from distcur import progress
from distcur.distributed.session import ensure_ray

log = logging.getLogger(__name__)


def run_jobs(fn: Callable[..., dict], calls: Sequence[tuple], jobs: Sequence[Any],
             on_result: Callable[[Any, dict], None] | None = None,
             describe: Callable[[dict], tuple[str, str]] | None = None, address: str | None = None,
             num_cpus: float = 1, max_retries: int = 2) -> list[dict]:
    """``fn(*call)`` for every call as a Ray task of ``num_cpus`` CPUs (retried ``max_retries`` times
    when its worker dies); results in ``jobs`` order (``jobs[i]`` names ``calls[i]``).

    One CPU per task (the function keeps torch to one thread), so a 2-core machine runs two jobs at
    once and a cluster spreads them over its nodes. ``on_result(job, result)`` runs on the driver as
    each one finishes (to commit it); ``describe(result)`` gives its log line and bar postfix."""
    import ray

    ensure_ray(address)
    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    refs = [remote.remote(*call) for call in calls]
    return wait_for_jobs(refs, list(jobs), on_result, describe)


def wait_for_jobs(refs: list, jobs: list, on_result: Callable[[Any, dict], None] | None = None,
                  describe: Callable[[dict], tuple[str, str]] | None = None) -> list[dict]:
    """Each job's result as it finishes, in ``jobs`` order.

    Where a bar is drawn (a terminal) the jobs are one bar, done / total with the latest result
    as its postfix, redrawn every few seconds while jobs run (each takes tens of seconds); each
    result is then logged at DEBUG (shown with ``-v``). Without a bar (logs, CI) each result is
    its own INFO line, as the bar would not be there to show it."""
    import ray

    describe = describe or (lambda r: (str(r), ""))
    results: list[dict] = [None] * len(refs)  # type: ignore[list-item]
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    with progress.bar(total=len(refs), desc="policies", unit="job") as jobs_bar:
        on_bar = not jobs_bar.disable
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            results[i] = r = ray.get(done[0])
            if on_result is not None:
                on_result(jobs[i], r)
            line, postfix = describe(r)
            log.log(logging.DEBUG if on_bar else logging.INFO, "[%d/%d] %s", len(refs) - len(pending), len(refs), line)
            jobs_bar.set_postfix_str(postfix, refresh=False)
            jobs_bar.update()
    return results
