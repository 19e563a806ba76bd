"""``distcur datamodel``: the command line of :mod:`distcur.stages.datamodel`.

Every option of :class:`~distcur.stages.datamodel.DatamodelConfig` is a flag (nested ones by their
own name: ``--recipe`` is ``metagrad.recipe``, ``--workers`` ``ray_train.num_workers``) and a key
of the ``--config`` YAML; the flags win over the file, the presets (``--full``,
``--metagrad-preset``) give way to both.
"""

from __future__ import annotations

import argparse

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE, add_config_flags, config_from_args, merge_options


def register(subparsers) -> None:
    from distcur.stages.datamodel import METAGRAD_PRESETS, DatamodelConfig

    p = subparsers.add_parser("datamodel", help="DataMIL datamodel scores (regression or meta-gradient)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--target", required=True, help="target task name (its demos at steps/source=target-<task>)")
    p.add_argument("--run", default=None, help="run name (default: datamodel-<estimator>-<target>)")
    p.add_argument("--metagrad-preset", choices=sorted(METAGRAD_PRESETS), default=None,
                   help="datamil: the reference recipe at 2-core size; datamil-paper: at the paper's "
                        "MetaWorld size")
    p.add_argument("--config", default=None, help="YAML with DatamodelConfig options")
    p.add_argument("--full", action="store_true", help="paper-size preset (3x400 policy, K=100 of T=1100, ...)")
    add_rerun_options(p)
    names = add_config_flags(p, DatamodelConfig, flags={"ray_train.num_workers": "--workers"})
    p.set_defaults(func=_main, config_names=names)


def _main(args: argparse.Namespace) -> int:
    from distcur.stages import datamodel

    datamodel.make_config(args.config, args.full, args.metagrad_preset)  # the file's own errors, naming it
    options = merge_options(datamodel.preset_options(args.full, args.metagrad_preset), datamodel.read_options(args.config))
    cfg = config_from_args(datamodel.DatamodelConfig, args, args.config_names, options)
    run = args.run or f"datamodel-{cfg.estimator}-{args.target}"
    m = datamodel.run(output_store(args.store, args), cfg, args.target, run)
    print(f"scores/{run}: {m.rows} steps, {m.metadata.get('clusters')} clusters"
          + (f", LDS {m.metadata['lds']:.3f}" if "lds" in m.metadata else "")
          + (f" (independent seeds {m.metadata['lds_independent_seeds']:.3f})"
             if m.metadata.get("lds_independent_seeds") is not None else "")
          + f", target injected: {m.metadata['inject_target']}")
    return 0
