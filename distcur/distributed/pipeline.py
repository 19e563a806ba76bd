"""Ray glue of ``distcur demo``: one Ray task per (method, seed) policy, trained and evaluated."""

from __future__ import annotations

import logging
from collections.abc import Callable

from distcur import progress
from distcur.distributed.session import ensure_ray

log = logging.getLogger(__name__)


def run_policy_jobs(store_uri: str, cfg, jobs: list[tuple[str, str | None, int]],
                    on_result: Callable[[tuple, dict], None] | None = None) -> list[dict]:
    """Run :func:`distcur.pipeline.train_and_evaluate` for every (method, selection run, seed).

    One CPU per task (torch uses one thread inside), so a 2-core machine trains two policies at
    once and a cluster spreads them over its nodes. Results come back in ``jobs`` order;
    ``on_result(job, row)`` is called on the driver as each one finishes (to commit it)."""
    import ray

    from distcur.pipeline import train_and_evaluate

    ensure_ray(cfg.address)
    remote = ray.remote(num_cpus=1, max_retries=2)(train_and_evaluate)
    refs = [remote.remote(store_uri, cfg, method, run, seed) for method, run, seed in jobs]
    return wait_for_jobs(refs, jobs, on_result)


def job_line(r: dict) -> str:
    """One finished job, as its log line and the job bar's postfix say it."""
    return (f"{r['method']:<22} seed {r['seed']}: success {r['success']:.2f}, proxy nll {r['proxy_loss']:.3f} "
            f"(train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s)")


def wait_for_jobs(refs: list, jobs: list[tuple], on_result: Callable[[tuple, dict], None] | None = None) -> list[dict]:
    """Each job's result as it finishes, in ``jobs`` order.

    Where a bar is drawn (a terminal) the jobs are one bar, done / total with the latest result
    as its postfix, redrawn every few seconds while jobs run (each takes tens of seconds); each
    result is then logged at DEBUG (shown with ``-v``). Without a bar (logs, CI) each result is
    its own INFO line, as the bar would not be there to show it."""
    import ray

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
            line = job_line(r)
            log.log(logging.DEBUG if on_bar else logging.INFO, "[%d/%d] %s", len(refs) - len(pending), len(refs), line)
            jobs_bar.set_postfix_str(f"{r['method']} seed {r['seed']}: success {r['success']:.2f}", refresh=False)
            jobs_bar.update()
    return results
