"""``distcur train``: train one policy on the target plus a weighted prior selection.

    distcur train --store URI --target TARGET --selection SELECTION --out RUN [--config YAML] [--ray]

Names map onto the store (``--store``, a folder or s3://bucket/prefix) as docs/store.md lays it out:

* ``--target``: a step source (``steps/source=<name>``), e.g. ``target-pick-place-wall-v3``; a
  bare task name ``pick-place-wall-v3`` means its ``target-<task>`` source.
* ``--selection``: a selection run (``selections/<run>``, or that key itself), or a baseline
  built on the fly: ``none`` (target-only), ``all`` (every prior step, weight 1),
  ``random:FRACTION[:SEED]`` (that fraction of prior episodes). Prior steps are read from
  ``--prior-store`` (default: the same store).
* ``--out``: the run name; the policy goes to ``policies/<run>/policy.pt`` (+ manifest.json,
  checkpoints/). A rerun resumes from the latest checkpoint; a finished identical run is skipped.
  ``--force`` trains it again from step 0 (resuming would restart from its last checkpoint).
"""

from __future__ import annotations

import json
import logging

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE
from distcur.devices import DEVICES

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a policy on target + weighted prior selection (co-training)",
        description=__doc__,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--target", required=True, help="target step source, or a task name meaning target-<task>")
    p.add_argument("--selection", required=True,
                   help="selection run / key under selections/, or none | all | random:FRACTION[:SEED]")
    p.add_argument("--out", required=True, help="run name: the policy goes to policies/<run>/")
    p.add_argument("--prior-store", default=None, help="store holding the prior step tables (default: --store)")
    p.add_argument("--config", default=None, help="YAML with TrainConfig options (hidden, lr, steps, alpha, ...)")
    p.add_argument("--steps", type=int, default=None, help="override TrainConfig.steps")
    p.add_argument("--seed", type=int, default=None, help="override TrainConfig.seed")
    p.add_argument("--alpha", type=float, default=None, help="override TrainConfig.alpha (target sampling prob)")
    p.add_argument("--batch-size", type=int, default=None, help="override TrainConfig.batch_size")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="override TrainConfig.device: auto (CUDA when present; under --ray, a GPU per worker when "
                        "the cluster has GPUs), cpu, cuda")
    p.add_argument("--action-normalization", choices=("auto", "global", "per-source"), default=None,
                   help="per-source: standardise each source's actions by its own mean/std (manifest) and act in "
                        "the target's space; auto (default): per-source when the sources' action spaces differ")
    p.add_argument("--fresh", action="store_true", help="delete the run's checkpoints instead of resuming")
    p.add_argument("--ray", action="store_true", help="train under Ray Train's TorchTrainer")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (with --ray)")
    p.add_argument("--max-failures", type=int, default=1, help="worker failures to recover from (with --ray)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train checkpoint storage (with --ray; default <store>/policies/<run>/ray)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    add_rerun_options(p)
    p.set_defaults(func=run)


def resolve_target(store, name: str) -> str:
    """A step source name for ``--target`` (the source itself, else ``target-<name>``)."""
    from distcur.data import steps_key, target_source

    if store.manifest(steps_key(name)) is not None:
        return name
    if store.manifest(steps_key(target_source(name))) is not None:
        return target_source(name)
    raise FileNotFoundError(f"--target {name!r}: neither {store.uri_of(steps_key(name))} nor "
                            f"{store.uri_of(steps_key(target_source(name)))} is a committed step table")


def resolve_selection(store, prior_store, spec: str):
    """(selection table or store key or None, allow_empty) for ``--selection``."""
    from distcur.policy.train import baseline_selection

    if spec == "none":
        return None, True
    if spec == "all":
        return baseline_selection(prior_store, "all"), False
    if spec.startswith("random:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"--selection {spec!r}: expected random:FRACTION[:SEED]")
        seed = int(parts[2]) if len(parts) == 3 else 0
        return baseline_selection(prior_store, "random", fraction=float(parts[1]), seed=seed), False
    return spec, False


def run(args) -> int:
    import torch

    from distcur.config import load_config
    from distcur.data import policy_key
    from distcur.policy.train import TrainConfig, load_training_data, read_selection, train_to_store
    from distcur.store import Store

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(TrainConfig, args.config, steps=args.steps, seed=args.seed, alpha=args.alpha,
                      batch_size=args.batch_size, device=args.device,
                      action_normalization=args.action_normalization)
    store = output_store(args.store, args)
    # a forced run starts over: resuming a finished run's checkpoints would recompute nothing
    fresh = args.fresh or args.force
    prior_store = Store(args.prior_store) if args.prior_store else store
    target = resolve_target(store, args.target)
    selection, allow_empty = resolve_selection(store, prior_store, args.selection)
    if args.ray:
        from distcur.distributed.train import train_policy_ray

        if fresh:
            store.delete_dir(f"{policy_key(args.out)}/ray")
        manifest = train_policy_ray(
            args.store, args.out, target, cfg, selection=selection, prior_store_uri=args.prior_store,
            allow_empty_selection=allow_empty, num_workers=args.workers, max_failures=args.max_failures,
            storage_path=args.storage_path, torch_threads=args.threads or 1, address=args.address,
            force=args.force, verify=args.verify,
        )
    else:
        table = read_selection(store, selection) if isinstance(selection, str) else selection
        data = load_training_data(store, target, table, prior_store, allow_empty_selection=allow_empty,
                                  action_normalization=cfg.action_normalization)
        log.info("training %s: %d target + %d prior steps", args.out, data.n_target, data.n_prior)
        manifest = train_to_store(store, args.out, data, cfg, resume=not fresh)
    print(json.dumps({"policy": store.uri_of(f"{policy_key(args.out)}/policy.pt"), "target": target,
                      "selection": args.selection, "rows": manifest.rows, "wall_s": manifest.wall_s,
                      "history_tail": manifest.metadata.get("history", [])}, indent=2))
    return 0
