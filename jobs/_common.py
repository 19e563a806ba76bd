"""What every ``jobs/<stage>.py`` does: read a YAML job config, run ``distcur <stage>``.

A job is a thin wrapper so there is one way to run each stage: the YAML section of the stage
is translated into that stage's own command line and handed to :func:`distcur.cli.main`,
exactly as if typed as ``distcur <stage> ...``. The stage's argparse parser is the schema:
an option the stage does not define is an error naming the config file, section and key.

Config layout (one file per pipeline, one section per stage)::

    description: free text                  # optional
    common:                                 # given to every stage that defines the option
      store: s3://bucket/distcur
    ingest:                                 # a mapping = one invocation of `distcur ingest`,
      - command: metaworld                  # a list = several, run in order
        tasks: [reach-v3, push-v3]          # --tasks reach-v3 push-v3  (nargs '+')
        episodes_per_task: 4                # --episodes-per-task 4
      - command: rlds                       # `path` fills the positional PATH
        path: s3://bucket/oxe/fractal20220817_data/0.1.0
        dataset: fractal20220817_data
    score:
      method: iwr

Keys map to ``--key-with-dashes``. ``command`` names the sub-command word(s) of stages that
have them (``ingest metaworld``); a key equal to a positional argument's name fills that
positional. Values: ``null`` leaves the stage's default; booleans set flags (``store_true``,
``store_false``: the key is the flag's name, ``true`` gives it; ``--x/--no-x``: ``x: false``
gives ``--no-x``); lists fill multi-value (``nargs``) or repeatable
(``append``) options; a mapping given to a single-value option (a stage's own ``--config``
YAML, e.g. ``ingest: {command: metaworld, config: {success_per_task: 2}}``) is written to a
temporary YAML file whose path is passed (the stage's errors name the job config file and
section instead); anything else is passed as its string. A list given to a single-value option
is an error, never silently joined.

Entry point: ``python jobs/<stage>.py --config FILE [--set KEY=VALUE ...] [--dry-run]``.
``--set`` overrides (or adds) a key of the stage's section (every entry when it is a list),
the value parsed as YAML; ``--dry-run`` prints the ``distcur`` command lines and runs nothing.
Under ``ray job submit`` Ray sets ``RAY_ADDRESS``, so each stage joins the submitting cluster.
"""

from __future__ import annotations

import os
import sys

JOBS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(JOBS_DIR)
# `python jobs/select.py` puts jobs/ first on sys.path, where select.py would shadow the
# standard library's `select` (imported by subprocess, socket, Ray). Take jobs/ off the path
# before importing anything else; this module is the only thing imported from there.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != JOBS_DIR]
# Prefer the distcur next to jobs/ (what `ray job submit --working-dir .` uploaded) over an
# installed copy, so a job runs the code that was submitted.
if os.path.isdir(os.path.join(REPO, "distcur")) and REPO not in sys.path:
    sys.path.insert(0, REPO)

import argparse  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

TOP_LEVEL = {"description", "common"}


def load_job_config(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping of a job config file, its top-level keys checked."""
    from distcur.cli import COMMANDS

    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at top level, got {type(data).__name__}")
    unknown = sorted(set(data) - TOP_LEVEL - set(COMMANDS))
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; expected stage names {list(COMMANDS)} or {sorted(TOP_LEVEL)}")
    if not isinstance(data.get("common") or {}, dict):
        raise ValueError(f"{path}: 'common' must be a mapping of options")
    return data


def section_entries(config: dict[str, Any], stage: str, where: str) -> list[dict[str, Any]]:
    """The invocations (one mapping each) of ``stage`` in a loaded job config."""
    if stage not in config:
        raise ValueError(f"{where}: no '{stage}' section; sections present: {sorted(set(config) - TOP_LEVEL)}")
    section = config[stage]
    if section is None:
        return [{}]
    entries = section if isinstance(section, list) else [section]
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: {stage}[{i}] must be a mapping of options, got {type(entry).__name__}")
    return [dict(e) for e in entries]


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _option_action(parser: argparse.ArgumentParser, key: str) -> tuple[argparse.Action, str] | tuple[None, None]:
    """The action of option ``--key`` (underscores read as dashes) and the flag string it matched."""
    for flag in ("--" + key.replace("_", "-"), "--" + key):
        for action in parser._actions:
            if flag in action.option_strings:
                return action, flag
    return None, None


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        raise ValueError(f"{where}: expected a single value, got {type(value).__name__} {value!r}")
    return str(value)


def _yaml_file(value: dict, tmpdir: str | None, where: str) -> str:
    """Write an inline mapping to a YAML file under ``tmpdir``; its path stands for the value.

    The file is headed by ``where`` (:data:`distcur.config.ORIGIN_COMMENT`), which the stage's errors
    name instead of the temporary path."""
    from distcur.config import ORIGIN_COMMENT

    if tmpdir is None:
        raise ValueError(f"{where}: a mapping value needs a directory to write it to (tmpdir)")
    fd, path = tempfile.mkstemp(prefix="job-", suffix=".yaml", dir=tmpdir)
    with os.fdopen(fd, "w") as f:
        f.write(f"{ORIGIN_COMMENT}{' '.join(where.split())}\n")
        yaml.safe_dump(value, f, sort_keys=False)
    return path


def _option_argv(action: argparse.Action, flag: str, value: Any, where: str, tmpdir: str | None = None) -> list[str]:
    if isinstance(value, dict) and action.nargs is None and type(action) is argparse._StoreAction:
        return [flag, _yaml_file(value, tmpdir, where)]
    if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreConstAction):
        # A flag key is the flag's own name: true gives the flag, false leaves it out
        # (for --x/--no-x, false on --x gives --no-x).
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {flag} is a flag; expected true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            positive = action.option_strings[0]
            negative = next(s for s in action.option_strings if s.startswith("--no-"))
            on = value if flag == positive else not value
            return [positive if on else negative]
        return [flag] if value else []
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {flag} counts; expected an integer >= 0, got {value!r}")
        return [flag] * value
    values = value if isinstance(value, list) else [value]
    multi = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if isinstance(action, argparse._AppendAction | argparse._ExtendAction) and not multi:
        return [part for v in values for part in (flag, _scalar(v, where))]
    if multi:
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise ValueError(f"{where}: {flag} takes {action.nargs} values, got {len(values)}: {values!r}")
        if not values and action.nargs == "+":
            raise ValueError(f"{where}: {flag} needs at least one value")
        return [flag, *(_scalar(v, where) for v in values)]
    if isinstance(value, list):
        raise ValueError(f"{where}: {flag} takes one value, got a list {value!r}")
    return [flag, _scalar(value, where)]


def _positional_argv(action: argparse.Action, value: Any, where: str) -> list[str]:
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
        values = value if isinstance(value, list) else [value]
        return [_scalar(v, where) for v in values]
    return [_scalar(value, where)]


def entry_argv(
    root: argparse.ArgumentParser,
    stage: str,
    entry: dict[str, Any],
    common: dict[str, Any],
    where: str,
    tmpdir: str | None = None,
) -> list[str]:
    """``distcur`` argv (without ``distcur``) for one section entry, checked against the stage's parser.

    ``root`` is the ``distcur`` parser (:func:`distcur.cli.build_parser`); ``where`` prefixes
    error messages (e.g. ``"jobs/configs/metaworld.yaml: ingest[0]"``); inline mappings are
    written as YAML files under ``tmpdir``.
    """
    entry = dict(entry)
    sub = _subparsers(root)
    if sub is None or stage not in sub.choices:
        known = sorted(sub.choices) if sub is not None else []
        raise ValueError(
            f"{where}: distcur has no '{stage}' command (is distcur/commands/{stage}.py missing?); available: {known}"
        )
    words = [stage]
    parser = sub.choices[stage]
    command = entry.pop("command", None)
    command_words = [] if command is None else (command.split() if isinstance(command, str) else list(command))
    for word in command_words:
        nested = _subparsers(parser)
        if nested is None:
            raise ValueError(f"{where}: `distcur {' '.join(words)}` has no sub-commands, but command: {command!r} was given")
        if word not in nested.choices:
            raise ValueError(
                f"{where}: `distcur {' '.join(words)}` has no sub-command {word!r}; choices: {sorted(nested.choices)}"
            )
        words.append(str(word))
        parser = nested.choices[word]
    nested = _subparsers(parser)
    if nested is not None:
        raise ValueError(
            f"{where}: `distcur {' '.join(words)}` needs a sub-command; set command: to one of {sorted(nested.choices)}"
        )

    prog = f"distcur {' '.join(words)}"
    positionals = [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    positional_dests = {a.dest for a in positionals}
    options: dict[str, Any] = {}
    # a common option the entry already sets under another of its names (ingest's --store is --out)
    entry_dests = {a.dest for a in (_option_action(parser, k)[0] for k in entry) if a is not None}
    for key, value in common.items():
        action = _option_action(parser, key)[0]
        if key in positional_dests or (action is not None and action.dest not in entry_dests):
            options[key] = value
    options.update(entry)

    argv: list[str] = list(words)
    for action in positionals:
        if action.dest in options:
            value = options.pop(action.dest)
            if value is not None:
                argv += _positional_argv(action, value, f"{where}: {action.dest}")
        elif action.nargs not in ("?", "*"):
            raise ValueError(f"{where}: `{prog}` needs the positional argument {action.dest!r}; add {action.dest}: ...")
    for key, value in options.items():
        action, flag = _option_action(parser, key)
        if action is None or isinstance(action, argparse._HelpAction | argparse._VersionAction):
            known = sorted(
                s[2:].replace("-", "_")
                for a in parser._actions
                for s in a.option_strings
                if s.startswith("--") and not isinstance(a, argparse._HelpAction)
            )
            raise ValueError(f"{where}: `{prog}` has no option --{key.replace('_', '-')} (key {key!r}); known: {known}")
        if value is None:
            continue
        argv += _option_argv(action, flag, value, f"{where}: {key}", tmpdir)
    return argv


def _apply_sets(entries: list[dict[str, Any]], sets: list[str]) -> list[dict[str, Any]]:
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(raw) if raw else None
        for entry in entries:
            entry[key.strip()] = value
    return entries


def stage_argvs(
    config_path: str | os.PathLike, stage: str, sets: list[str] | tuple[str, ...] = (), tmpdir: str | None = None
) -> list[list[str]]:
    """Every ``distcur`` argv that ``jobs/<stage>.py --config config_path`` runs, in order.

    Inline mappings (stage config YAMLs) are written under ``tmpdir``, which must outlive the runs.
    """
    from distcur.cli import build_parser

    config = load_job_config(config_path)
    where = str(config_path)
    entries = _apply_sets(section_entries(config, stage, where), list(sets))
    common = dict(config.get("common") or {})
    root = build_parser()
    return [
        entry_argv(root, stage, entry, common, f"{where}: {stage}[{i}]" if len(entries) > 1 else f"{where}: {stage}",
                   tmpdir)
        for i, entry in enumerate(entries)
    ]


def build_job_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"jobs/{stage}.py", description=f"Ray job entry point: run `distcur {stage}` from a YAML job config."
    )
    parser.add_argument("--config", required=True, help="job config YAML (e.g. jobs/configs/metaworld.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a key of the '{stage}' section"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the distcur command lines, run nothing")
    return parser


def main(stage: str, argv: list[str] | None = None) -> int:
    """Run the ``stage`` section of ``--config``; the first failing invocation's exit code, else 0."""
    args = build_job_parser(stage).parse_args(argv)
    from distcur.cli import main as distcur_main

    with tempfile.TemporaryDirectory(prefix=f"distcur-job-{stage}-") as tmpdir:
        try:
            argvs = stage_argvs(args.config, stage, args.set, tmpdir)
        except (ValueError, FileNotFoundError) as e:
            print(f"jobs/{stage}.py: error: {e}", file=sys.stderr)
            return 2
        for stage_argv in argvs:
            print(f"distcur {shlex.join(stage_argv)}", flush=True)
            if args.dry_run:
                continue
            rc = distcur_main(stage_argv)
            if rc != 0:
                print(f"jobs/{stage}.py: `distcur {shlex.join(stage_argv)}` exited with {rc}", file=sys.stderr)
                return rc
    return 0
