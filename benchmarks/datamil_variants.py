"""DataMIL variants at docs/benchmarks.md's protocol policy, one (target, datamodel config) per call.

Runs ``distcur demo``'s pipeline (:func:`distcur.stages.demo.run_demo`) for the DataMIL methods
only, on a store that already holds (or will generate) the demo prior, with DatamodelConfig
overrides given as JSON; prints the selection's make-up (successful episodes per task) and merges
the records under ``variants[<name>]`` of ``benchmarks/results/quality_metaworld_dm_variants.json``.
It is how the variants in README's DataMIL section were compared; the defaults chosen from them are
recorded in ``quality_metaworld.json`` by ``distcur demo --protocol-policy --record``.

Usage:
    python benchmarks/datamil_variants.py --store /tmp/q-ppw --target pick-place-wall-v3 \
        --name mse-m1024 --datamodel '{"proxy": "mse", "regression": {"num_models": 1024}}' \
        [--methods datamodel-regression datamodel-metagrad] [--run exp-mse-m1024]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "quality_metaworld_dm_variants.json"


def prior_episodes(store):
    """Per prior episode: its task and whether it succeeded (the MetaWorld prior's steps, read once)."""
    steps = store.read_table("steps/source=metaworld", columns=["episode", "task", "success"]).to_pandas()
    return steps.groupby("episode").agg(task=("task", "first"), succ=("success", "max"))


def selection_makeup(store, ep, run: str, method: str) -> dict:
    """{"episodes": n, "successful": k, "by_task": {task: "successful/selected"}} of a selection;
    ``ep`` from :func:`prior_episodes`."""
    sel = store.read_table(f"selections/{run}-{method}", columns=["episode"]).to_pandas()
    e = ep.loc[sel.episode.unique()]
    by_task = e.groupby("task").succ.agg(lambda x: f"{int(x.sum())}/{len(x)}").to_dict()
    return {"episodes": int(len(e)), "successful": int(e.succ.sum()), "by_task": by_task}


def merge_variant(path: Path, name: str, target: str, datamodel: dict, records: list[dict],
                  makeup: dict[str, dict]) -> None:
    """Read-modify-write (atomic) of the variants file: replaces ``variants[name][target]``."""
    try:
        current = json.loads(path.read_text())
    except FileNotFoundError:
        current = {"about": __doc__.split("\n\n")[0], "variants": {}}
    v = current["variants"].setdefault(name, {"datamodel": datamodel, "targets": {}})
    if v["datamodel"] != datamodel:
        raise ValueError(f"variant {name!r} was recorded with datamodel {v['datamodel']}, not {datamodel}")
    v["targets"][target] = {"records": records, "selections": makeup}
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
    os.replace(tmp, path)


def main() -> int:
    from distcur.config import load_config, merge_options
    from distcur.stages.demo import DATAMODELS, PROTOCOL_POLICY, DemoConfig, run_demo
    from distcur.store import Store

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--name", required=True, help="variant name in the results file")
    ap.add_argument("--datamodel", default="{}", help="DatamodelConfig overrides as JSON")
    ap.add_argument("--methods", nargs="+", default=list(DATAMODELS))
    ap.add_argument("--run", default=None, help="run name in the store (default exp-<name>)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    datamodel = json.loads(args.datamodel)
    run = args.run or f"exp-{args.name}"
    cfg = load_config(DemoConfig, merge_options(PROTOCOL_POLICY, {
        "store": args.store, "target": args.target, "run": run, "methods": tuple(args.methods), "seeds": (0, 1, 2),
        "evaluation": {"episodes": 50}, "datamodel": datamodel}))
    table = run_demo(cfg).to_pandas()
    store = Store(args.store)
    ep = prior_episodes(store)
    makeup = {m: selection_makeup(store, ep, run, m) for m in args.methods}
    for m, info in makeup.items():
        print(m, info)
    print(table.groupby("method").success.agg(["mean", "sem"]))
    merge_variant(Path(args.results), args.name, args.target, datamodel, table.to_dict(orient="records"), makeup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
