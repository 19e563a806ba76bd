"""``distcur demo``: the whole pipeline on the embedded MetaWorld default, with a results table.

Its flags are :class:`distcur.stages.demo.DemoConfig`'s fields, the policy's training options
(``train``) and its evaluation (``evaluation``) included; ``--config`` takes the same as YAML.
"""

from __future__ import annotations

import time

from distcur.config import add_config_flags

# the flags whose names differ from their field's
FLAGS = {"prior_kind": "--prior", "budget_percent": "--budget", "train.steps": "--train-steps"}
# set per job (seed), or how a run reports rather than what it computes: not flags of the demo
SKIP = ("prior", "vae", "iwr", "datamodel", "train.seed", "train.checkpoint_every", "train.log_every")


def register(sub) -> None:
    from distcur.methods import IWR_KERNELS
    from distcur.policy.sampler import MIXINGS
    from distcur.stages.demo import DemoConfig

    p = sub.add_parser("demo", help="ingest, embed, score, datamodels, co-train and evaluate on MetaWorld")
    names = add_config_flags(p, DemoConfig, flags=FLAGS, skip=SKIP, choices={"train.mixing": MIXINGS},
                             helps={"store": "store URI (default ./distcur-store/demo, or ./distcur-store/demo-datamil "
                                             "with --prior datamil)",
                                    "train.steps": "policy training steps (default 1500)",
                                    "train.hidden": "policy MLP widths (default 256 256)",
                                    "train.mixing": "co-training batches: each element from the target with "
                                                    "probability alpha (bernoulli, default), or exactly alpha x batch "
                                                    "target rows (split: BehaviorRetrieval's half-and-half batches)"})
    p.add_argument("--full", action="store_true", help="paper-size run (hours on 2 cores)")
    p.add_argument("--protocol-policy", action="store_true",
                   help="train and evaluate with the benchmark protocol's policy (MLP 3 x 400, 4000 steps, "
                        "500-step rollouts) on the demo's prior")
    p.add_argument("--iwr-kernel", choices=IWR_KERNELS, default=None,
                   help="IWR's KDEs: one whitening by the prior's covariance (default), or each set its own "
                        "covariance and Scott factor (two scipy gaussian_kde)")
    p.add_argument("--datamodel-proxy", choices=("nll", "mse"), default=None,
                   help="the DataMIL methods' proxy loss (distcur.policy.proxy; default mse)")
    p.add_argument("--datamodel-config", default=None, metavar="YAML",
                   help="DatamodelConfig options for the DataMIL methods (e.g. metagrad: {recipe: datamil})")
    p.add_argument("--record", default=None, metavar="JSON",
                   help="merge the results into this quality_metaworld.json (docs/benchmarks.md)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="with --record: label these records as a variant of the default settings (kept beside them)")
    p.add_argument("--report", action="store_true", help="also write the HTML report into the store")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="DemoConfig options (prior, vae, datamodel, train, evaluation, ...; docs/tutorial.md); the "
                        "flags above win over it")
    p.add_argument("--force", action="store_true",
                   help="recompute every stage and policy job even when the store holds them")
    p.set_defaults(func=run, config_names=names)


def demo_config(args):
    """The DemoConfig of a command line: --full's or --protocol-policy's options, then the --config
    file, then the flags given."""
    import os

    from distcur.config import DEFAULT_STORE, config_from_args, load_config, merge_options, read_yaml
    from distcur.stages.demo import PROTOCOL_POLICY, DemoConfig, full_options

    base = full_options() if args.full else dict(PROTOCOL_POLICY) if args.protocol_policy else {}
    if args.config:  # checked against DemoConfig's field types here, so errors name the file and key
        load_config(DemoConfig, args.config)
        base = merge_options(base, read_yaml(args.config) or {})
    if args.store is None and args.prior_kind == "datamil" and "store" not in base:
        base["store"] = os.path.join(DEFAULT_STORE, "demo-datamil")
    cfg = config_from_args(DemoConfig, args, args.config_names, base)
    if args.iwr_kernel:
        cfg.iwr = {**cfg.iwr, "kernel": args.iwr_kernel}
    if args.datamodel_config:
        given = read_yaml(args.datamodel_config) or {}
        if not isinstance(given, dict):
            raise ValueError(f"{args.datamodel_config}: expected a YAML mapping of DatamodelConfig options")
        cfg.datamodel = merge_options(cfg.datamodel, given)
    if args.datamodel_proxy:
        cfg.datamodel = {**cfg.datamodel, "proxy": args.datamodel_proxy}
    return cfg


def run(args) -> int:
    from distcur.data import eval_key
    from distcur.stages.demo import run_demo
    from distcur.stages.quality import check_recordable, merge_quality_json, protocol_of, quality_records
    from distcur.stages.report import write_report
    from distcur.stats import format_table, paired_comparisons, success_summary
    from distcur.store import Store

    t0 = time.time()
    cfg = demo_config(args)
    if args.record and not args.variant:  # fail now, not after hours of training
        check_recordable(args.record, {"protocol": protocol_of(cfg)})
    table = run_demo(cfg, force=args.force)
    print()
    print(f"distcur demo: target {cfg.target}, {cfg.prior_kind} prior, {len(cfg.seeds)} seeds x "
          f"{cfg.evaluation.episodes} episodes, budget {cfg.budget_percent:g}% of prior steps, "
          + (f"alpha {cfg.train.alpha}" if cfg.cotrain else "selection alone"))
    print(format_table(success_summary(table), paired_comparisons(table)))
    diagnostics = Store(cfg.store).manifest(eval_key(cfg.run)).metadata.get("selections", {})
    if args.report:
        print("report:", write_report(Store(cfg.store), cfg.run))
    if args.record:
        merge_quality_json(args.record, quality_records(table, protocol_of(cfg), diagnostics, args.variant))
        print("recorded:", args.record)
    print(f"wall {time.time() - t0:.0f} s")
    return 0
