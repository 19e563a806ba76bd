"""One TorchTrainer over a list of work items that commit themselves to the store.

The datamodel stage's heavy work is many independent items (a batch of stacked subset models,
one meta-gradient iteration), each of which commits its own store table; the table's manifest
is the item's done bit. :func:`fit_items` starts ONE ``TorchTrainer`` for a whole list (one
start-up amortised over every item): worker ``rank`` of ``world`` takes items
``rank::world`` (:func:`worker_share`), skips those already committed, runs the rest on
``ray.train.torch.get_device()`` and calls ``ray.train.report`` once per slot of its share, so
every worker reports the same number of times (``report`` is a barrier across workers).

Fault tolerance: ``FailureConfig(max_failures)`` restarts the worker group after a lost worker
or an error; the restarted workers take the same shares, and since the committed items' bits
are read from the store, only the unfinished items are redone. No Ray Train checkpoint is
needed: the store is the checkpoint.

How this maps to a cluster: ``num_workers`` workers, each with ``cpus_per_worker`` CPUs and
``gpus_per_worker`` GPUs (``ScalingConfig``), placed by Ray on whichever nodes have them; a
worker with a GPU trains on it (``get_device``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

EXECUTORS = ("ray-tasks", "ray-train")


@dataclass
class RayTrainSettings:
    """The Ray Train executor's ``ScalingConfig`` and ``FailureConfig``."""

    num_workers: int = 2
    cpus_per_worker: int = 1  # also the worker's torch threads
    gpus_per_worker: float = 0.0  # > 0: use_gpu, each worker trains on its GPU
    max_failures: int = 2  # worker-group restarts (a lost worker, an error) before the stage fails

    def __post_init__(self):
        if self.num_workers < 1 or self.cpus_per_worker < 1 or self.gpus_per_worker < 0 or self.max_failures < 0:
            raise ValueError(f"ray_train needs num_workers >= 1, cpus_per_worker >= 1, gpus_per_worker >= 0 and "
                             f"max_failures >= 0, got {self}")

    def scaling_config(self):
        from ray.train import ScalingConfig

        resources: dict[str, float] = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker > 0:
            resources["GPU"] = float(self.gpus_per_worker)
        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.gpus_per_worker > 0,
                             resources_per_worker=resources)


def check_executor(executor: str) -> None:
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")


def worker_share(items: Sequence[Any], rank: int, world: int) -> tuple[list[Any], int]:
    """(this worker's items ``items[rank::world]``, the slots every worker reports: ceil(n / world))."""
    return list(items[rank::world]), math.ceil(len(items) / world)


def fire_fault_once(marker: str | None, item: int) -> None:
    """Fault injection for tests: if ``item`` is listed in the file ``marker`` (``<item>`` exits the
    worker process abruptly, a lost worker; ``raise:<item>`` raises), strike it from the file
    first, so the restarted worker goes through."""
    if not marker or not os.path.exists(marker):
        return
    with open(marker) as f:
        entries = f.read().split()
    hit = next((e for e in entries if e in (str(item), f"raise:{item}")), None)
    if hit is None:
        return
    entries.remove(hit)
    tmp = f"{marker}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(entries))
    os.replace(tmp, marker)
    if hit.startswith("raise:"):
        raise RuntimeError(f"injected failure at item {item}")
    os._exit(1)


def run_share(items: Sequence[Any], is_done: Callable[[Any], bool], work: Callable[[Any], None],
              fault_marker: str | None = None, key: Callable[[Any], int] = int) -> int:
    """Inside a Ray Train worker: run this worker's share of ``items``, skipping committed ones,
    reporting after each slot; returns how many it ran."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mine, slots = worker_share(items, rank, world)
    ran = 0
    for slot in range(slots):
        item = mine[slot] if slot < len(mine) else None
        did = item is not None and not is_done(item)
        if did:
            fire_fault_once(fault_marker, key(item))
            work(item)
            ran += 1
        ray.train.report({"rank": rank, "slot": slot, "ran": int(did), "ran_total": ran})
    return ran


def fit_items(loop: Callable[[dict], None], config: dict, settings: RayTrainSettings, storage: str, name: str,
              progress: Callable[[], None] | None = None, poll_s: float = 2.0) -> None:
    """Run ``loop(config)`` as the ``train_loop_per_worker`` of one TorchTrainer and wait for it.

    ``storage``: Ray Train's run directory (local path or s3://). ``progress()`` is called every
    ``poll_s`` seconds from a thread while the trainer runs (it reads the done bits from the
    store and moves the driver's bar) and once at the end. Raises the run's error after
    ``settings.max_failures`` restarts."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from distcur.store import resolve

    fs, path = resolve(storage)
    trainer = TorchTrainer(
        loop, train_loop_config=config, scaling_config=settings.scaling_config(),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=settings.max_failures)),
    )
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_s):
            try:
                progress()
            except Exception as e:  # a progress read must never break the stage
                log.debug("progress poll failed: %s", e)

    thread = threading.Thread(target=poll, daemon=True) if progress is not None else None
    if thread is not None:
        thread.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    if progress is not None:
        progress()
    if result.error is not None:
        raise result.error


def worker_device(threads: int):
    """In a Ray Train worker: torch threads set to the worker's CPUs, and its device (its GPU when
    it has one, else the CPU)."""
    import ray.train.torch
    import torch

    torch.set_num_threads(threads)
    return ray.train.torch.get_device()
