"""Ray glue for MetaWorld: prior generation over (task x chunk) and batched rollout evaluation.

The work itself is plain code in :mod:`distcur.sources.metaworld` and
:mod:`distcur.evaluate.metaworld`; here it only fans out as Ray tasks. Ray worker processes
are reused, so each keeps one pool of environments per task (built on first use).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray

from distcur import progress
from distcur.distributed.session import ensure_ray


def _gather(refs: list, show: bool, label: str) -> list:
    """Results of ``refs`` in order, with a progress bar on stderr as they finish (where bars are
    drawn at all: :func:`distcur.progress.enabled`)."""
    if not show:
        return ray.get(refs)
    pending = list(refs)
    with progress.bar(total=len(refs), desc=label, unit="task") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return ray.get(refs)


@ray.remote(num_cpus=1)
def _generate_chunk(cfg, specs):
    from distcur.sources.metaworld import generate_chunk

    return generate_chunk(cfg, specs)


def run_generation_chunks(
    cfg: Any, chunks: Sequence[Sequence[Any]], address: str | None = None, progress: bool = True
) -> list:
    """:func:`distcur.sources.metaworld.generate_chunk` over ``chunks`` as Ray tasks, in order."""
    ensure_ray(address)
    cfg_ref = ray.put(cfg)
    refs = [_generate_chunk.remote(cfg_ref, list(c)) for c in chunks]
    return _gather(refs, progress, "metaworld episodes")


@ray.remote(num_cpus=1)
def _rollout_batch(policy, task, seed, episodes, max_steps, onehot_over):
    from distcur.evaluate.metaworld import rollout_batch

    return rollout_batch(policy, task, seed, episodes, max_steps=max_steps, append_task_onehot_over=onehot_over)


def run_rollout_batches(
    policy: Callable,
    task: str,
    jobs: Sequence[tuple[int, Sequence[int]]],
    max_steps: int,
    append_task_onehot_over: tuple[str, ...] | None,
    address: str | None = None,
    progress: bool = False,
) -> list[dict]:
    """:func:`distcur.evaluate.metaworld.rollout_batch` for each ``(seed, episodes)`` job as Ray tasks."""
    ensure_ray(address)
    policy_ref = ray.put(policy)
    refs = [
        _rollout_batch.remote(policy_ref, task, seed, list(eps), max_steps, append_task_onehot_over)
        for seed, eps in jobs
    ]
    return _gather(refs, progress, f"rollouts {task}")
