"""Starting or joining Ray: one place, so every stage behaves the same."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, attempts: int = 3) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) if given, else start a private local Ray.

    No-op when Ray is already initialised. A local start is retried: on a loaded machine the
    raylet can miss Ray's fixed registration window, and a retry then succeeds."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    for attempt in range(1, attempts + 1):
        try:
            # "local" always starts a private Ray: a bare ray.init() would join whatever cluster
            # `ray start` last left in /tmp/ray (possibly a dead one).
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:  # Ray raises a bare Exception on a start-up timeout
            ray.shutdown()
            if attempt == attempts:
                raise
            log.warning("local Ray did not start (%s); retrying (%d/%d)", e, attempt, attempts)
