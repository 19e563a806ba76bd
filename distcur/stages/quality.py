"""``quality_metaworld.json``: the demo's results as benchmark records, and the one writer of the file.

``distcur demo --record`` merges a run's rows here (one record per task, prior, method, seed and
variant, each with its selection's make-up); a run under another protocol than the file's records is
refused unless it is a ``--variant``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pyarrow as pa

from distcur.config import to_dict
from distcur.sources.metaworld import PRIOR_SOURCE
from distcur.stages.demo import BASELINES, DemoConfig
from distcur.store import fingerprint

RECORD_FIELDS = ("task", "prior", "method", "seed", "episodes", "success", "proxy_loss", "budget",
                 "selected_fraction", "level")


def quality_records(table: pa.Table, protocol: dict, diagnostics: dict | None = None,
                    variant: str | None = None) -> dict:
    """The demo's results in the ``quality_metaworld.json`` layout: one record per (task, prior,
    method, seed[, variant]), each with the make-up of its selection (share of steps from successful
    episodes and from the target task's failed attempts); the full make-up and the overlaps between
    methods go under ``selections/<prior>/<task>[/<variant>]``. ``variant`` names a run whose settings
    differ from the defaults (its records sit beside the default ones instead of replacing them)."""
    rows = table.to_pylist()
    diagnostics = diagnostics or {}
    records = []
    for r in rows:
        rec = {k: r.get(k) for k in RECORD_FIELDS}
        if variant:
            rec["variant"] = variant
        comp = (diagnostics.get(r["method"]) or {}).get("composition") or {}
        if comp:
            rec.update(success_share=comp.get("success_share"), target_failure_share=comp.get("target_failure_share"))
        records.append(rec)
    out: dict[str, Any] = {"protocol": {f"variant/{variant}": protocol} if variant else protocol, "results": records}
    if diagnostics and rows:
        out["selections"] = {f"{rows[0]['prior']}/{rows[0]['task']}" + (f"/{variant}" if variant else ""): diagnostics}
    return out


def merge_quality_json(path: str | os.PathLike, new: dict, drop_task_prefix: str | None = None) -> None:
    """Read-modify-write of ``quality_metaworld.json``, the one writer every run goes through.

    Replaces the records of (task, method, seed) present in ``new`` (and, with
    ``drop_task_prefix``, every record whose task starts with it) and keeps all others;
    ``new["protocol"]`` entries replace the protocol's entries of the same name."""
    try:
        with open(path) as f:
            current = json.load(f)
    except FileNotFoundError:
        current = {"protocol": {}, "results": []}
    def ident(r: dict) -> tuple:
        return r["task"], r.get("prior"), r["method"], r["seed"], r.get("variant")

    _check_same_protocol(path, current, new)
    keys = {ident(r) for r in new["results"]}
    kept = [r for r in current.get("results", [])
            if ident(r) not in keys and not (drop_task_prefix and str(r["task"]).startswith(drop_task_prefix))]
    protocol = dict(current.get("protocol", {}))
    protocol.update(new.get("protocol", {}))
    # a run over some of the methods updates their entries and keeps the others'
    selections = dict(current.get("selections", {}))
    for where, methods in new.get("selections", {}).items():
        selections[where] = {**selections.get(where, {}), **methods}
    out = {**current, "protocol": protocol, "results": kept + new["results"],
           **({"selections": selections} if selections else {})}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# The protocol entries every default (non-variant) record of one file shares, and in them the
# settings that change a result; seeds and per-target entries (the prior's task list) may differ.
SHARED_PROTOCOL = {"evaluation": ("episodes", "max_steps", "proxy"), "policy": None,
                   "selection": ("budget_percent", "retrieval_level", "tie_seed", "iwr"), "datamodel": None}


def _check_same_protocol(path: str | os.PathLike, current: dict, new: dict) -> None:
    """Refuse to merge default records made under another protocol than the file's (it would
    rewrite the protocol the other records were measured under); such a run is a ``--variant``
    or goes to another file."""
    if not any("variant" not in r for r in current.get("results", [])):
        return
    # compared as the file stores them (tuples are lists there)
    old, given = current.get("protocol", {}), json.loads(json.dumps(new.get("protocol", {}), default=str))
    for entry, fields in SHARED_PROTOCOL.items():
        if entry not in old or entry not in given:
            continue
        a, b = old[entry], given[entry]
        names = fields or sorted(set(a) | set(b))
        differ = [f"{entry}.{n}: {b.get(n)!r} (file: {a.get(n)!r})" for n in names if a.get(n) != b.get(n)]
        if differ:
            raise ValueError(f"{path}: these results were made under another protocol than the file's records "
                             f"({'; '.join(differ)}); record them with --variant NAME or into another file")


def check_recordable(path: str | os.PathLike, new: dict) -> None:
    """Before a long run: would :func:`merge_quality_json` accept ``new`` (its protocol) into ``path``?"""
    try:
        with open(path) as f:
            current = json.load(f)
    except FileNotFoundError:
        return
    _check_same_protocol(path, current, new)


def _datamodel_protocol(cfg: DemoConfig) -> dict:
    """The DataMIL methods' resolved settings (defaults included), without the runtime fields."""
    from distcur.stages.datamodel import make_config

    d = to_dict(make_config(dict(cfg.datamodel)))
    # the demo's prior is its one generated source (the stage's default resolves to it)
    if d.get("prior_sources") is None:
        d["prior_sources"] = [PRIOR_SOURCE]
    # round_size 1 is the reference's sequence, as every record before the field existed
    if d.get("metagrad", {}).get("round_size") == 1:
        d["metagrad"] = {k: v for k, v in d["metagrad"].items() if k != "round_size"}
    # runtime fields: where the work runs, not what it computes (the same numbers either way)
    return {k: v for k, v in d.items() if k not in ("address", "max_retries", "estimator", "executor", "ray_train")}


def protocol_of(cfg: DemoConfig) -> dict:
    prior = dataclasses.asdict(cfg.prior_config())
    return {f"prior_{cfg.prior_kind}": {k: prior[k] for k in ("kind", "tasks", "success_per_task", "failed_per_task",
                                                              "target_demos", "success_noise", "failed_noise",
                                                              "failed_modes", "failed_max_steps", "max_steps")},
            "policy": {"hidden": list(cfg.train.hidden), "train_steps": cfg.train.steps,
                       "batch_size": cfg.train.batch_size, "alpha": cfg.train.alpha, "cotrain": cfg.cotrain,
                       "mixing": cfg.train.mixing, **cfg.train_extras()},
            "selection": {"budget_percent": cfg.budget_percent, "retrieval_level": cfg.retrieval_level,
                          "levels": {m: cfg.level_of(m) for m in cfg.methods if m not in BASELINES},
                          "tie_seed": cfg.tie_seed, "iwr": dict(cfg.iwr)},
            "evaluation": {"episodes": cfg.evaluation.episodes, "max_steps": cfg.evaluation.max_steps,
                           "seeds": list(cfg.seeds),
                           "proxy": f"BC NLL on {cfg.evaluation.heldout_demos} held-out expert demos"},
            "datamodel": _datamodel_protocol(cfg),
            "config_fingerprint": fingerprint(cfg.flat())}
