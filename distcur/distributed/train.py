"""A data-parallel training function under Ray Train's ``TorchTrainer`` (an executor: no domain code).

:class:`DataParallel` runs ``fn(payload, ctx)`` in each of ``num_workers`` workers. The
:class:`WorkerContext` gives the worker its rank and world size, its device (the GPU Ray Train
gave it with ``use_gpu``, else the CPU), ``all_reduce`` (a sum over the workers, gloo) and the
state dict to resume from; ``ctx.report(metrics, state)`` reports a ``ray.train.Checkpoint``
(rank 0 writes the state dict as ``state.pt`` in a directory; the others report metrics only).

Fault tolerance: ``FailureConfig(max_failures)`` restarts failed workers, which find the last
reported state in ``ctx.resume`` (from ``ray.train.get_checkpoint()``). Checkpoints live under
``storage_path`` (local or s3://; the stage gives a default); the last ``checkpoints_to_keep`` are kept.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distcur.distributed.raytrain import RayTrainSettings, check_cluster_resources, fit_loop
from distcur.distributed.session import ensure_ray
from distcur.torchio import torch_load

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


@dataclass
class WorkerContext:
    """What one worker of :class:`DataParallel` knows of the group."""

    rank: int
    world: int
    device: torch.device
    resume: dict | None  # the state dict last reported (after a restart), else None

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over every worker, in place."""
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def report(self, metrics: dict, state: dict | None = None) -> None:
        """``ray.train.report(metrics)``, with ``state`` as the checkpoint (rank 0's)."""
        import ray.train

        if self.rank == 0 and state is not None:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def _worker_loop(config: dict) -> None:
    """``train_loop_per_worker``: runs inside each Ray Train worker."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch_load(os.path.join(d, STATE_FILE), f"Ray Train checkpoint {checkpoint.path}",
                                config["resume_hint"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    config["fn"](config["payload"], WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), device, resume))


@dataclass
class DataParallel:
    """``num_workers`` TorchTrainer workers (``max_failures`` restarts) running one training function."""

    num_workers: int = 1
    max_failures: int = 1
    storage_path: str | None = None  # Ray Train's checkpoint storage; None: where the stage says
    torch_threads: int = 1
    address: str | None = None
    checkpoints_to_keep: int = 2

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")

    def fit(self, fn: Callable[[Any, WorkerContext], None], payload: Any, storage: str,
            use_gpu: bool | Callable[[], bool] = False, name: str = "train",
            resume_hint: str = "delete the run's Ray Train storage to start over") -> None:
        """Run ``fn(payload, ctx)`` on every worker and wait; raises the run's error after the
        restarts. ``use_gpu`` (or a function of the joined cluster giving it): a GPU per worker."""
        ensure_ray(self.address)
        gpu = use_gpu() if callable(use_gpu) else use_gpu
        settings = RayTrainSettings(num_workers=self.num_workers, cpus_per_worker=1,
                                    gpus_per_worker=1.0 if gpu else 0.0, max_failures=self.max_failures)
        check_cluster_resources(settings, option="train")
        config = {"fn": fn, "payload": payload, "torch_threads": self.torch_threads, "use_gpu": gpu,
                  "resume_hint": resume_hint}
        fit_loop(_worker_loop, config, settings, storage, name, checkpoints_to_keep=self.checkpoints_to_keep,
                 use_gpu=gpu)
