"""Ray glue of ``distcur demo``: one Ray task per (method, seed) policy, trained and evaluated."""

from __future__ import annotations

import logging
from collections.abc import Callable

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
    results: list[dict] = [None] * len(refs)  # type: ignore[list-item]
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = index[done[0]]
        results[i] = ray.get(done[0])
        r = results[i]
        if on_result is not None:
            on_result(jobs[i], r)
        log.info("[%d/%d] %-22s seed %d: success %.2f, proxy %.3f (train %.0f s, eval %.0f s)",
                 len(refs) - len(pending), len(refs), r["method"], r["seed"], r["success"], r["proxy_loss"],
                 r["train_s"], r["eval_s"])
    return results
