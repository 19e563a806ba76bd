"""What a datamodel's cluster scores follow: Spearman of tau (and tau per step) with each cluster's size
and with whether its episode succeeded, per datamodel of the given demo stores -> datamodel_tau.json.

A datamodel whose ranking follows cluster size fills a step budget with long episodes; one whose ranking
follows success picks the successful demos. The stores are those ``distcur demo --protocol-policy``
writes (``datamodels/<run>-datamodel-<estimator>/tau`` over episode clusters of ``steps/source=metaworld``).

    python benchmarks/datamodel_tau_diagnostics.py --stores hard-ppw=/path/to/store ... [--run demo]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402


def tau_figures(store_uri: str, run: str) -> dict:
    from distcur.data import datamodel_key, steps_key
    from distcur.store import Store

    store = Store(store_uri)
    steps = store.read_table(steps_key("metaworld"), columns=["episode", "success"]).to_pandas()
    success = steps.groupby("episode").success.max()
    out = {}
    for estimator in ("regression", "metagrad"):
        key = datamodel_key(f"{run}-datamodel-{estimator}", "tau")
        if store.manifest(key) is None:
            continue
        t = store.read_table(key, columns=["key", "size", "tau"]).to_pandas()
        source, episode = t.key.str.split("/").str[0], t.key.str.split("/").str[1].astype(int)
        t = t[source == "metaworld"].assign(episode=episode[source == "metaworld"])
        succ = success.reindex(t.episode).to_numpy().astype(float)
        per_step = t.tau.to_numpy() / t["size"].to_numpy()
        out[estimator] = {"clusters": int(len(t)),
                          "spearman_tau_size": float(spearmanr(t.tau, t["size"])[0]),
                          "spearman_tau_success": float(spearmanr(t.tau, succ)[0]),
                          "spearman_tau_per_step_success": float(spearmanr(per_step, succ)[0]),
                          "successful_clusters": int(np.nansum(succ))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", nargs="+", required=True, metavar="NAME=URI")
    ap.add_argument("--run", default="demo")
    args = ap.parse_args()
    figures = {}
    for item in args.stores:
        name, _, uri = item.partition("=")
        figures[name] = tau_figures(uri, args.run)
    path = write_result("datamodel_tau", {"run": args.run, "datamodels": figures,
                                          "what": "Spearman of each datamodel's cluster scores (tau; tau / size) "
                                                  "with cluster size and with episode success"})
    for name, f in figures.items():
        for est, v in f.items():
            print(f"{name:14s} {est:10s} clusters {v['clusters']:4d}  tau~size {v['spearman_tau_size']:+.2f}  "
                  f"tau~success {v['spearman_tau_success']:+.2f}  tau/size~success {v['spearman_tau_per_step_success']:+.2f}")
    print("->", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
