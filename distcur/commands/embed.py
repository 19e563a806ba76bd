"""``distcur embed``: fit an encoder on the prior and embed every step through Ray Data.

The flags are built from :class:`distcur.stages.embed.EmbedConfig` (``--config`` YAML: any of its
fields; the flags win)."""

from __future__ import annotations

import json

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE, add_config_flags, config_from_args
from distcur.stages.embed import EmbedConfig


def register(sub) -> None:
    p = sub.add_parser("embed", help="fit an encoder (default: state-action VAE) and embed every source")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    names = add_config_flags(p, EmbedConfig, skip=("encoder_options",))
    p.add_argument("--config", default=None, help="YAML with EmbedConfig options (encoder_options, sources, ...)")
    p.add_argument("--weights", default=None,
                   help="backbone encoder: a state_dict / TorchScript file, a transformers folder or hub id "
                        "(encoder_options.weights)")
    add_rerun_options(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run, config_names=names)


def run(args) -> int:
    from distcur.stages import embed

    config = config_from_args(EmbedConfig, args, args.config_names, args.config)
    if args.weights is not None:
        config.encoder_options = {**config.encoder_options, "weights": args.weights}
    manifests = embed.run(output_store(args.store, args), config, address=args.address)
    print(json.dumps({key: {"rows": m.rows, "dim": m.metadata.get("dim")} for key, m in manifests.items()}, indent=2))
    return 0
