"""One TorchTrainer over lists of work items that commit themselves (an executor: no domain code).

A stage hands :func:`fit_plan` a plan: rounds of work items, ``work(item)`` and
``is_done(item)`` callables (the item's done bit is whatever the stage commits, e.g. a store
manifest). ONE ``TorchTrainer`` runs the whole plan (one start-up amortised over every item):
in each round worker ``rank`` of ``world`` takes items ``rank::world`` (:func:`worker_share`),
skips the done ones, runs the rest on ``ray.train.torch.get_device()`` and calls
``ray.train.report`` once per slot of its share, so every worker reports the same number of
times (``report`` is a barrier across workers: a round is finished everywhere before the next
begins, and ``after_round`` may read what it committed).

Fault tolerance: ``FailureConfig(max_failures)`` restarts the worker group after a lost worker
or an error; the restarted workers take the same shares, and since ``is_done`` reads the
committed bits, only the unfinished items are redone. No Ray Train checkpoint is needed: the
store is the checkpoint.

How this maps to a cluster: ``num_workers`` workers, each with ``cpus_per_worker`` CPUs and
``gpus_per_worker`` GPUs (``ScalingConfig``), placed by Ray on whichever nodes have them; a
worker with a GPU trains on it (``get_device``). A cluster that cannot hold them (GPUs asked
for, none there) fails at once with the option and what the cluster has
(:func:`check_cluster_resources`), instead of the trainer waiting forever; a cluster with an
autoscaler is given ``resource_wait_s`` to add the nodes.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXECUTORS = ("ray-tasks", "ray-train")


@dataclass
class RayTrainSettings:
    """The Ray Train executor's ``ScalingConfig`` and ``FailureConfig``."""

    num_workers: int = field(default=2, metadata={"help": "ray-train: TorchTrainer workers (default 2)"})
    cpus_per_worker: int = 1  # also the worker's torch threads
    gpus_per_worker: float = field(default=0.0, metadata={  # > 0: use_gpu, each worker trains on its GPU
        "help": "ray-train: GPUs per worker (default 0: CPU workers)"})
    max_failures: int = 2  # worker-group restarts (a lost worker, an error) before the stage fails
    # How long to wait for the cluster to hold the workers' CPUs / GPUs before failing; None: a few
    # seconds (NO_AUTOSCALER_WAIT_S), or AUTOSCALER_WAIT_S on a cluster with an autoscaler (nodes come up)
    resource_wait_s: float | None = None

    def __post_init__(self):
        if self.num_workers < 1 or self.cpus_per_worker < 1 or self.gpus_per_worker < 0 or self.max_failures < 0:
            raise ValueError(f"ray_train needs num_workers >= 1, cpus_per_worker >= 1, gpus_per_worker >= 0 and "
                             f"max_failures >= 0, got {self}")
        if self.resource_wait_s is not None and self.resource_wait_s < 0:
            raise ValueError(f"ray_train.resource_wait_s must be >= 0 (or null), got {self.resource_wait_s}")

    def scaling_config(self, use_gpu: bool | None = None):
        """``ScalingConfig`` of these workers; ``use_gpu`` None: when ``gpus_per_worker`` > 0 (True
        with no ``gpus_per_worker``: one GPU each)."""
        from ray.train import ScalingConfig

        use_gpu = self.gpus_per_worker > 0 if use_gpu is None else use_gpu
        resources: dict[str, float] = {"CPU": float(self.cpus_per_worker)}
        if use_gpu:
            resources["GPU"] = float(self.gpus_per_worker or 1.0)
        return ScalingConfig(num_workers=self.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


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


class ClusterTooSmall(ValueError):
    """The Ray cluster does not hold the workers a config asks for (and did not grow to within the wait)."""


NO_AUTOSCALER_WAIT_S = 5.0
AUTOSCALER_WAIT_S = 600.0


def has_autoscaler() -> bool:
    """Whether this Ray cluster may scale itself: one started by the cluster launcher (``ray up``)
    has its bootstrap config on the head node (Ray Tune's own test), and a cluster of several nodes
    is taken to be one that adds them. A lone local Ray never grows; on a KubeRay cluster that
    starts with its head alone, give ``resource_wait_s``."""
    import ray

    if Path("~/ray_bootstrap_config.yaml").expanduser().exists():
        return True
    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def check_cluster_resources(settings: RayTrainSettings, option: str = "ray_train", wait_s: float | None = None,
                            poll_s: float = 0.5, resources: Callable[[], dict] | None = None) -> None:
    """Fail with a clear error when the Ray cluster does not hold ``settings``' workers (a TorchTrainer
    would wait for them forever): ``num_workers x gpus_per_worker`` GPUs, ``num_workers x
    cpus_per_worker`` CPUs. The cluster's totals are polled for ``wait_s`` (default:
    ``settings.resource_wait_s``, else a few seconds, or longer where an autoscaler may add nodes)."""
    import ray

    read = resources or ray.cluster_resources
    need = {"GPU": settings.num_workers * settings.gpus_per_worker,
            "CPU": float(settings.num_workers * settings.cpus_per_worker)}
    if wait_s is None:
        wait_s = settings.resource_wait_s
    autoscaler = has_autoscaler()
    if wait_s is None:
        wait_s = AUTOSCALER_WAIT_S if autoscaler else NO_AUTOSCALER_WAIT_S
    deadline = time.monotonic() + wait_s
    while True:
        have = read()
        short = [r for r, n in need.items() if n > 0 and have.get(r, 0.0) < n]
        if not short or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if not short:
        return
    per = {"GPU": ("gpus_per_worker", settings.gpus_per_worker), "CPU": ("cpus_per_worker", settings.cpus_per_worker)}
    parts = [f"{option}.{per[r][0]} = {per[r][1]:g} x num_workers = {settings.num_workers} asks for {need[r]:g} {r}s, "
             f"but the Ray cluster has {have.get(r, 0.0):g}" for r in short]
    hint = ("set gpus_per_worker: 0 (CPU workers, --gpus-per-worker 0) or run on a cluster with GPU nodes"
            if "GPU" in short else "ask for fewer workers or CPUs per worker")
    raise ClusterTooSmall(f"{'; '.join(parts)} (waited {wait_s:g} s{' for the autoscaler' if autoscaler else ''}; "
                     f"{option}.resource_wait_s waits longer): {hint}")


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


@dataclass
class WorkPlan:
    """What one worker runs: ``rounds`` of items (each round a barrier), ``work(item)`` for the items
    ``is_done(item)`` says are missing, ``after_round(round)`` once every worker finished it;
    ``key(item)`` is the item's number for fault injection (tests)."""

    rounds: Iterable[Sequence[Any]]
    is_done: Callable[[Any], bool]
    work: Callable[[Any], None]
    after_round: Callable[[Sequence[Any]], None] | None = None
    key: Callable[[Any], int] = int


def _plan_worker(config: dict) -> None:
    """``train_loop_per_worker``: the stage's plan, built in the worker from the shared payload."""
    import ray

    device = worker_device(config["threads"])
    plan: WorkPlan = config["make_plan"](ray.get(config["payload"]), device)
    for rnd in plan.rounds:
        run_share(list(rnd), plan.is_done, plan.work, config["fault_marker"], plan.key)
        if plan.after_round is not None:
            plan.after_round(rnd)


def fit_plan(make_plan: Callable[[Any, Any], WorkPlan], payload: Any, settings: RayTrainSettings, storage: str,
             name: str, progress: Callable[[], None] | None = None, fault_marker: str | None = None,
             address: str | None = None, poll_s: float = 2.0) -> None:
    """Run ``make_plan(payload, device)``'s plan on every worker of one TorchTrainer and wait for it.

    ``payload`` (the arrays every worker needs) goes to the object store once. ``storage``: Ray
    Train's run directory (local path or s3://). ``progress()`` is called every ``poll_s`` seconds
    from a thread while the trainer runs (it reads the done bits and moves the driver's bar) and
    once at the end. Raises the run's error after ``settings.max_failures`` restarts."""
    import ray

    from distcur.distributed.session import ensure_ray

    ensure_ray(address)
    check_cluster_resources(settings)
    config = {"make_plan": make_plan, "payload": ray.put(payload), "threads": settings.cpus_per_worker,
              "fault_marker": fault_marker}
    fit_loop(_plan_worker, config, settings, storage, name, progress, poll_s)


@dataclass
class RayTrain:
    """An executor: plans of work items on one TorchTrainer each (:func:`fit_plan`), on the Ray at
    ``address``; the datamodel stage's ``executor: ray-train``."""

    settings: RayTrainSettings = field(default_factory=RayTrainSettings)
    address: str | None = None
    kind: str = field(default="ray-train", init=False)

    def run(self, make_plan: Callable[[Any, Any], WorkPlan], payload: Any, storage: str, name: str,
            progress: Callable[[], None] | None = None, fault_marker: str | None = None) -> None:
        fit_plan(make_plan, payload, self.settings, storage, name, progress, fault_marker, self.address)


def fit_loop(loop: Callable[[dict], None], config: dict, settings: RayTrainSettings, storage: str, name: str,
             progress: Callable[[], None] | None = None, poll_s: float = 2.0, checkpoints_to_keep: int | None = None,
             use_gpu: bool | None = None) -> Any:
    """Run ``loop(config)`` as the ``train_loop_per_worker`` of one TorchTrainer and wait for it;
    returns its ``Result``. ``progress`` as in :func:`fit_plan`; ``checkpoints_to_keep`` keeps that
    many ``ray.train.Checkpoint``s the loop reports (None: Ray's default, all). Raises the run's
    error after ``settings.max_failures`` restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from distcur.store import resolve

    fs, path = resolve(storage)
    trainer = TorchTrainer(
        loop, train_loop_config=config, scaling_config=settings.scaling_config(use_gpu),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep)),
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
    return result


def worker_device(threads: int):
    """In a Ray Train worker: torch threads set to the worker's CPUs, and its device (its GPU when
    it has one, else the CPU)."""
    import ray.train.torch
    import torch

    torch.set_num_threads(threads)
    return ray.train.torch.get_device()
