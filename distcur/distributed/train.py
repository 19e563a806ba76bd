"""Ray Train glue: the one training loop of :mod:`distcur.policy.train` under ``TorchTrainer``.

Each worker reads the target and the selected prior steps from the store, then runs
:func:`~distcur.policy.train.train_policy`. With ``num_workers > 1`` every worker takes the rows
``rank::num_workers`` of each global batch (the batch order is a pure function of (seed, step),
so all workers agree on it without communication) and gradients are summed with
``torch.distributed.all_reduce`` (gloo): the update equals the one-process update up to float
summation order.

Fault tolerance: rank 0 reports a ``ray.train.Checkpoint`` (a directory holding ``state.pt``,
the same weights-only checkpoint dict as the one-process path) every ``checkpoint_every``
steps; ``FailureConfig(max_failures)`` restarts failed workers, which resume from
``ray.train.get_checkpoint()``. Checkpoints live under ``storage_path`` (default
``<store>/policies/<run>/ray``, local or s3://); rerunning the same run name resumes there too.
The finished policy is written by rank 0 to ``policies/<run>/policy.pt`` with a manifest.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable

import pyarrow as pa
import torch

from distcur.data import policy_key
from distcur.devices import ray_gpus
from distcur.distributed.session import ensure_ray
from distcur.policy.train import (
    STAGE,
    TrainConfig,
    final_state,
    fingerprint_config,
    load_training_data,
    read_selection,
    train_policy,
    write_policy,
)
from distcur.store import Manifest, Store, resolve
from distcur.torchio import torch_load

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def _worker_loop(config: dict) -> None:
    """``train_loop_per_worker``: runs inside each Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    torch.set_num_threads(config["torch_threads"])
    t0 = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    store = Store(config["store"])
    selection = config["selection"]
    if isinstance(selection, str):
        selection = read_selection(store, selection)
    cfg: TrainConfig = config["cfg"]
    data = load_training_data(store, config["target"], selection, Store(config["prior_store"]),
                              allow_empty_selection=config["allow_empty_selection"],
                              action_normalization=cfg.action_normalization)

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch_load(os.path.join(d, STATE_FILE), f"Ray Train checkpoint {checkpoint.path}",
                                "start over with `distcur train --ray --fresh`")

    def report(state: dict) -> None:
        history = state["meta"]["history"]
        metrics = {"step": state["step"], "loss": history[-1]["loss"] if history else float("nan")}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    # the GPU Ray Train gave this worker (use_gpu), else the CPU
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    params, normalizer, history = train_policy(
        data, cfg, resume_from=resume, checkpoint_fn=report, on_step=config["on_step"],
        rank=rank, world_size=world, all_reduce=all_reduce if world > 1 else None, device=device,
    )
    if rank == 0:
        write_policy(store, config["run"], final_state(params, normalizer, cfg, data, history), cfg, data.inputs,
                     time.time() - t0)


def train_policy_ray(
    store_uri: str,
    run: str,
    target_source: str,
    cfg: TrainConfig,
    selection: str | pa.Table | None = None,
    prior_store_uri: str | None = None,
    allow_empty_selection: bool = False,
    num_workers: int = 1,
    max_failures: int = 1,
    storage_path: str | None = None,
    torch_threads: int = 1,
    on_step: Callable[[int], None] | None = None,
    address: str | None = None,
    force: bool = False,
    verify: bool = False,
) -> Manifest:
    """Train ``policies/<run>`` under ``TorchTrainer`` and return its manifest.

    Workers hold a GPU each (``use_gpu``) when ``cfg.device`` is ``cuda``, or ``auto`` on a cluster
    with GPUs (cluster.yaml's ``gpu_worker`` nodes), and train there; else they run on CPUs.

    ``selection``: a selection key / run name in the store (read by each worker), a selection
    table, or None (target-only). ``storage_path``: where Ray Train keeps checkpoints (local
    path or s3://; default ``<store>/policies/<run>/ray``). ``on_step(step)`` is called in every
    worker after each step (progress, fault injection in tests). A finished run with the same
    config and inputs is skipped (checked against the manifest, like every stage), unless ``force``;
    with ``verify`` only when its files also verify (the store's ``force`` / ``verify_done``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    store = Store(store_uri, force=force, verify_done=verify)
    prior_uri = prior_store_uri or store_uri
    if selection is not None and not isinstance(selection, str | pa.Table):
        raise ValueError(f"selection must be a store key, a table or None, got {type(selection).__name__}")
    # The driver assembles the data once: it validates the inputs early and gives the skip check its inputs.
    sel_table = read_selection(store, selection) if isinstance(selection, str) else selection
    data = load_training_data(store, target_source, sel_table, Store(prior_uri), allow_empty_selection,
                              action_normalization=cfg.action_normalization)
    config = fingerprint_config(cfg)
    if store.is_done(policy_key(run), STAGE, config, data.inputs):
        log.info("policy %s is up to date, skipping", store.uri_of(policy_key(run)))
        return store.manifest(policy_key(run))
    del data

    storage = storage_path or store.uri_of(f"{policy_key(run)}/ray")
    fs, path = resolve(storage)
    ensure_ray(address)
    use_gpu = ray_gpus(cfg.device, "TrainConfig.device") > 0
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "store": store_uri, "prior_store": prior_uri, "target": target_source, "selection": selection,
            "allow_empty_selection": allow_empty_selection, "cfg": cfg, "run": run, "on_step": on_step,
            "torch_threads": torch_threads, "use_gpu": use_gpu,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name="train",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    manifest = store.manifest(policy_key(run))
    if manifest is None:
        raise RuntimeError(f"Ray Train finished but wrote no policy at {store.uri_of(policy_key(run))}")
    return manifest
