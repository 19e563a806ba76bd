"""``distcur embed``: fit an encoder on the prior and embed every step through Ray Data."""

from __future__ import annotations

import json

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE
from distcur.devices import DEVICES


def register(sub) -> None:
    p = sub.add_parser("embed", help="fit an encoder (default: state-action VAE) and embed every source")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--encoder", default=None, help="registered encoder: vae (default), state, action, state-action, image-vae "
                   "(conv VAE on the frames), backbone (pretrained ViT: encoder_options.weights), image")
    p.add_argument("--config", default=None, help="YAML with EmbedConfig options (encoder_options, sources, ...)")
    p.add_argument("--sources", nargs="+", default=None, help="sources to embed (default: all in the store)")
    p.add_argument("--concurrency", type=int, default=None, help="embedding actors in the Ray Data pool")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="where the encoder fits and embeds: auto (CUDA when present; default), cpu, cuda")
    p.add_argument("--weights", default=None,
                   help="backbone encoder: a state_dict / TorchScript file, a transformers folder or hub id")
    add_rerun_options(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def run(args) -> int:
    from distcur.config import load_config
    from distcur.distributed.embed import EmbedConfig, run_embed

    config = load_config(EmbedConfig, args.config, encoder=args.encoder, sources=args.sources,
                         concurrency=args.concurrency, device=args.device)
    if args.weights is not None:
        config.encoder_options = {**config.encoder_options, "weights": args.weights}
    manifests = run_embed(output_store(args.store, args), config, address=args.address)
    print(json.dumps({key: {"rows": m.rows, "dim": m.metadata.get("dim")} for key, m in manifests.items()}, indent=2))
    return 0
