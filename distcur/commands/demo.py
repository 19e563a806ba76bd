"""``distcur demo``: the whole pipeline on the embedded MetaWorld default, with a results table."""

from __future__ import annotations

import time

from distcur import methods as registry
from distcur.methods import IWR_KERNELS


def register(sub) -> None:
    p = sub.add_parser("demo", help="ingest, embed, score, datamodels, co-train and evaluate on MetaWorld")
    p.add_argument("--target", default=None, help="MetaWorld target task (default pick-place-wall-v3)")
    p.add_argument("--store", default=None, help="store URI (default ./distcur-store/demo)")
    p.add_argument("--run", default=None, help="run name (default demo)")
    p.add_argument("--methods", nargs="+", default=None, choices=registry.names(), metavar="METHOD",
                   help=f"subset of methods to compare: {', '.join(registry.names())}")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--episodes", type=int, default=None, help="rollouts per (method, seed)")
    p.add_argument("--full", action="store_true", help="paper-size run (hours on 2 cores)")
    p.add_argument("--protocol-policy", action="store_true",
                   help="train and evaluate with the benchmark protocol's policy (MLP 3 x 400, 4000 steps, "
                        "500-step rollouts) on the demo's prior")
    p.add_argument("--hidden", nargs="+", type=int, default=None, help="policy MLP widths")
    p.add_argument("--train-steps", type=int, default=None, help="policy training steps")
    p.add_argument("--max-steps", type=int, default=None, help="rollout horizon")
    p.add_argument("--prior", choices=("hard", "datamil"), default=None,
                   help="hard (default: the target's successes left out of the prior) or datamil (every usable "
                        "v3 task, 10 demos + 10 failures each, the target's own demos in the prior)")
    p.add_argument("--budget", type=float, default=None, metavar="PERCENT",
                   help="share of the prior's steps every method selects (default 10)")
    p.add_argument("--retrieval-level", choices=("step", "subtraj"), default=None,
                   help="granularity of SR / AR / BR / IWR and of random (default step, as their papers)")
    p.add_argument("--no-cotrain", action="store_true",
                   help="train on the selection alone (DataMIL's final MetaWorld policy) instead of co-training")
    p.add_argument("--mixing", choices=("bernoulli", "split"), default=None,
                   help="co-training batches: each element from the target with probability alpha (default), or "
                        "exactly alpha x batch target rows (BehaviorRetrieval's half-and-half batches)")
    p.add_argument("--iwr-kernel", choices=IWR_KERNELS, default=None,
                   help="IWR's KDEs: one whitening by the prior's covariance (default), or each set its own "
                        "covariance and Scott factor (two scipy gaussian_kde)")
    p.add_argument("--datamodel-proxy", choices=("nll", "mse"), default=None,
                   help="the DataMIL methods' proxy loss (distcur.datamodels.proxy; default mse)")
    p.add_argument("--datamodel-config", default=None, metavar="YAML",
                   help="DatamodelConfig options for the DataMIL methods (e.g. metagrad: {recipe: datamil})")
    p.add_argument("--address", default=None, help="Ray address (default: local Ray or RAY_ADDRESS)")
    p.add_argument("--record", default=None, metavar="JSON",
                   help="merge the results into this quality_metaworld.json (docs/benchmarks.md)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="with --record: label these records as a variant of the default settings (kept beside them)")
    p.add_argument("--report", action="store_true", help="also write the HTML report into the store")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="DemoConfig options (prior, vae, datamodel, ...; docs/tutorial.md); the flags above win over it")
    p.add_argument("--force", action="store_true",
                   help="recompute every stage and policy job even when the store holds them")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from distcur.config import DEFAULT_STORE
    from distcur.data import eval_key
    from distcur.pipeline import (
        PROTOCOL_POLICY,
        DemoConfig,
        check_recordable,
        merge_quality_json,
        protocol_of,
        quality_records,
        run_demo,
    )
    from distcur.report import format_table, paired_comparisons, success_summary, write_report
    from distcur.store import Store

    t0 = time.time()
    store = args.store or (os.path.join(DEFAULT_STORE, "demo-datamil") if args.prior == "datamil" else None)
    given = {"target": args.target, "store": store, "run": args.run, "address": args.address,
             "methods": tuple(args.methods) if args.methods else None,
             "seeds": tuple(args.seeds) if args.seeds else None, "episodes": args.episodes,
             "hidden": tuple(args.hidden) if args.hidden else None, "train_steps": args.train_steps,
             "max_steps": args.max_steps, "prior_kind": args.prior, "budget_percent": args.budget,
             "retrieval_level": args.retrieval_level, "cotrain": False if args.no_cotrain else None,
             "mixing": args.mixing}
    from_file = {}
    if args.config:  # checked against DemoConfig's field types here, so errors name the file and key
        from distcur.config import load_config, read_yaml

        load_config(DemoConfig, args.config)
        from_file = read_yaml(args.config) or {}
    # Explicit options win over the config file, which wins over --protocol-policy's settings.
    overrides = {**(PROTOCOL_POLICY if args.protocol_policy else {}), **from_file,
                 **{k: v for k, v in given.items() if v is not None}}
    cfg = DemoConfig.full(**overrides) if args.full else DemoConfig(**overrides)
    if args.iwr_kernel:
        cfg.iwr = {**cfg.iwr, "kernel": args.iwr_kernel}
    if args.datamodel_config:
        from distcur.config import read_yaml
        from distcur.stages.datamodel import merge_options

        given = read_yaml(args.datamodel_config) or {}
        if not isinstance(given, dict):
            raise ValueError(f"{args.datamodel_config}: expected a YAML mapping of DatamodelConfig options")
        cfg.datamodel = merge_options(cfg.datamodel, given)
    if args.datamodel_proxy:
        cfg.datamodel = {**cfg.datamodel, "proxy": args.datamodel_proxy}
    if args.record and not args.variant:  # fail now, not after hours of training
        check_recordable(args.record, {"protocol": protocol_of(cfg)})
    table = run_demo(cfg, force=args.force)
    print()
    print(f"distcur demo: target {cfg.target}, {cfg.prior_kind} prior, {len(cfg.seeds)} seeds x {cfg.episodes} "
          f"episodes, budget {cfg.budget_percent:g}% of prior steps, "
          + (f"alpha {cfg.alpha}" if cfg.cotrain else "selection alone"))
    print(format_table(success_summary(table), paired_comparisons(table)))
    diagnostics = Store(cfg.store).manifest(eval_key(cfg.run)).metadata.get("selections", {})
    if args.report:
        print("report:", write_report(Store(cfg.store), cfg.run))
    if args.record:
        merge_quality_json(args.record, quality_records(table, protocol_of(cfg), diagnostics, args.variant))
        print("recorded:", args.record)
    print(f"wall {time.time() - t0:.0f} s")
    return 0
