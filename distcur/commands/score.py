"""``distcur score``: score every prior step for a target task (sr, ar, br, strap, iwr, random).

The method options are built from the scorers' config fields in :mod:`distcur.methods`; an
option the chosen method does not take is an error, never silently ignored."""

from __future__ import annotations

import json
import typing

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE, flag_kwargs
from distcur.methods import get, names, option_fields


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _argument(f, methods: list[str]) -> dict:
    """argparse keywords for one config field (default None: only options given are passed); its
    type as :func:`distcur.config.flag_kwargs` maps every config field's."""
    hint = typing.get_type_hints(get(methods[0]).config)[f.name]
    kw = {"default": None, "dest": f.name, "help": f"{'/'.join(methods)}: {f.metadata['help']}", **flag_kwargs(hint)}
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    return kw


def register(sub) -> None:
    p = sub.add_parser("score", help="score every prior step against the target demos of a task")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--method", required=True, choices=names("scorer"))
    p.add_argument("--target", required=True, help="target task name (its demos are source target-<task>)")
    p.add_argument("--run", required=True, help="output run name: writes scores/<run>")
    p.add_argument("--prior-sources", nargs="+", default=None, help="prior sources (default: all non-target)")
    for f, methods in option_fields().values():
        p.add_argument(_flag(f), **_argument(f, methods))
    p.add_argument("--config", default=None, metavar="YAML",
                   help="the method's options (the fields of its config in distcur.methods); the flags above win")
    add_rerun_options(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def _options_file(path: str, method: str) -> dict:
    """The method options in the YAML at ``path``, checked against the method's config class
    (unknown keys and wrong types are errors naming the file)."""
    from distcur.config import load_config, read_yaml

    cfg = load_config(get(method).config, path)
    return {k: getattr(cfg, k) for k in read_yaml(path) or {}}


def run(args) -> int:
    from distcur.distributed.score import score

    options = option_fields()
    given = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    unused = sorted(_flag(options[n][0]) for n in given if args.method not in options[n][1])
    if unused:
        raise ValueError(f"option(s) {unused} do not apply to --method {args.method}")
    if args.config:
        given = {**_options_file(args.config, args.method), **given}
    m = score(output_store(args.store, args), args.method, args.target, args.run, prior_sources=args.prior_sources,
              address=args.address, **given)
    print(json.dumps({"scores": f"scores/{args.run}", "rows": m.rows, "method": args.method,
                      "target": args.target}, indent=2))
    return 0
