"""``distcur score``: score every prior step for a target task (sr, ar, br, strap, iwr, random).

The flags are built from :class:`distcur.stages.score.ScoreConfig` and from the scorers' config
fields in :mod:`distcur.methods`; an option the chosen method does not take is an error, never
silently ignored. ``--config`` YAML: any ScoreConfig key (method, target, run, prior_sources) and
the method's options; the flags win."""

from __future__ import annotations

import json
import typing

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE, ConfigError, add_config_flags, config_from_args, flag_kwargs
from distcur.methods import get, option_fields
from distcur.stages.score import ScoreConfig

SKIP = ("scorer",)


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _argument(f, methods: list[str]) -> dict:
    """argparse keywords for one scorer option (default None: only options given are passed); its
    type as :func:`distcur.config.flag_kwargs` maps every config field's."""
    hint = typing.get_type_hints(get(methods[0]).config)[f.name]
    kw = {"default": None, "dest": f.name, "help": f"{'/'.join(methods)}: {f.metadata['help']}",
          **flag_kwargs(hint)}
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    return kw


def register(sub) -> None:
    p = sub.add_parser("score", help="score every prior step against the target demos of a task")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI (folder or s3://bucket/prefix)")
    names = add_config_flags(p, ScoreConfig, skip=SKIP)
    for f, methods in option_fields().values():
        p.add_argument(_flag(f), **_argument(f, methods))
    p.add_argument("--config", default=None, metavar="YAML",
                   help="ScoreConfig keys and the method's options (the fields of its config in distcur.methods); "
                        "the flags above win")
    add_rerun_options(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run, config_names=names)


def _config_file(path: str, method: str | None) -> dict:
    """The YAML at ``path`` as ScoreConfig data: its ScoreConfig keys, the rest the method's options,
    checked against the method's config class (unknown keys and wrong types are errors naming the file)."""
    from distcur.config import config_origin, load_config, read_yaml

    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{config_origin(path)}: expected a YAML mapping at top level, got {type(data).__name__}")
    own = {k: v for k, v in data.items() if k in ScoreConfig.__dataclass_fields__}
    options = {k: v for k, v in data.items() if k not in own}
    method = method or own.get("method")
    if method is not None:
        try:
            cfg = load_config(get(method).config, {**dict(own.get("scorer") or {}), **options})
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{config_origin(path)}: {e}") from None
        own["scorer"] = {k: getattr(cfg, k) for k in {**dict(own.get("scorer") or {}), **options}}
    return own


def run(args) -> int:
    from distcur.stages import score

    options = option_fields()
    method = args.method
    source = _config_file(args.config, method) if args.config else {}
    method = method or source.get("method")
    given = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    unused = sorted(_flag(options[n][0]) for n in given if method not in options[n][1])
    if unused:
        raise ValueError(f"option(s) {unused} do not apply to --method {method}")
    source["scorer"] = {**dict(source.get("scorer") or {}), **given}
    config = config_from_args(ScoreConfig, args, args.config_names, source)
    m = score.run(output_store(args.store, args), config, address=args.address)
    print(json.dumps({"scores": f"scores/{config.run}", "rows": m.rows, "method": config.method,
                      "target": config.target}, indent=2))
    return 0
