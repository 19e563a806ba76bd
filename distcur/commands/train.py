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
from distcur.config import DEFAULT_STORE, add_config_flags, config_from_args
from distcur.devices import DEVICES

log = logging.getLogger(__name__)


def register(sub) -> None:
    import argparse

    from distcur.policy.train import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a policy on target + weighted prior selection (co-training)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--target", required=True, help="target step source, or a task name meaning target-<task>")
    p.add_argument("--selection", required=True,
                   help="selection run / key under selections/, or none | all | random:FRACTION[:SEED]")
    p.add_argument("--out", required=True, help="run name: the policy goes to policies/<run>/")
    p.add_argument("--prior-store", default=None, help="store holding the prior step tables (default: --store)")
    p.add_argument("--config", default=None, help="YAML with TrainConfig options (hidden, lr, steps, alpha, ...)")
    names = add_config_flags(p, TrainConfig, choices={"device": DEVICES, "action_normalization": ("auto", "global", "per-source")},
                             helps={"device": "auto (CUDA when present; under --ray, a GPU per worker when the cluster "
                                              "has GPUs), cpu, cuda",
                                    "action_normalization": "per-source: standardise each source's actions by its own "
                                                            "mean/std (manifest) and act in the target's space; auto "
                                                            "(default): per-source when the sources' action spaces differ",
                                    "alpha": "target sampling probability"})
    p.add_argument("--fresh", action="store_true", help="delete the run's checkpoints instead of resuming")
    p.add_argument("--ray", action="store_true", help="train under Ray Train's TorchTrainer")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (with --ray)")
    p.add_argument("--max-failures", type=int, default=1, help="worker failures to recover from (with --ray)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train checkpoint storage (with --ray; default <store>/policies/<run>/ray)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    add_rerun_options(p)
    p.set_defaults(func=run, config_names=names)


def run(args) -> int:
    import torch

    from distcur.data import policy_key
    from distcur.distributed.train import DataParallel
    from distcur.policy.train import TrainConfig
    from distcur.stages import train
    from distcur.store import Store

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(TrainConfig, args, args.config_names, args.config)
    store = output_store(args.store, args)
    prior_store = Store(args.prior_store) if args.prior_store else store
    target = train.resolve_target(store, args.target)
    selection, allow_empty = train.resolve_selection(prior_store, args.selection)
    executor = DataParallel(num_workers=args.workers, max_failures=args.max_failures, storage_path=args.storage_path,
                            torch_threads=args.threads or 1, address=args.address) if args.ray else None
    # a forced run starts over: resuming a finished run's checkpoints would recompute nothing
    manifest = train.run(store, cfg, target, selection, args.out, prior_store=prior_store,
                         allow_empty_selection=allow_empty, resume=not (args.fresh or args.force), executor=executor)
    print(json.dumps({"policy": store.uri_of(f"{policy_key(args.out)}/policy.pt"), "target": target,
                      "selection": args.selection, "rows": manifest.rows, "wall_s": manifest.wall_s,
                      "history_tail": manifest.metadata.get("history", [])}, indent=2))
    return 0
