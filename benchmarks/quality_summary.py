"""Summary of ``quality_metaworld.json``: per prior and target, each method's success (mean ± s.e.
over seeds), its paired difference to random and to the best similarity method (95% t-interval),
its selection's size and make-up, and how well the reported proxy tracks rollout success.

    python benchmarks/quality_summary.py [--results benchmarks/results/quality_metaworld.json]
        [--out benchmarks/results/quality_summary.json] [--markdown]

Reads only the committed records (written by ``distcur demo --record``); ``--markdown`` prints
the tables the README shows.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow as pa
from scipy import stats

from distcur.stats import SIMILARITY_METHODS, paired_comparisons

HERE = os.path.dirname(os.path.abspath(__file__))


def summarize(results: list[dict], selections: dict) -> dict:
    """{"<prior>/<task>": {"methods": {...}, "proxy_success_spearman": rho, ...}} over curation records."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("prior") is None or str(r["task"]).startswith("imbalanced/"):
            continue
        groups.setdefault(f"{r['prior']}/{r['task']}", []).append(
            {**r, "method": r["method"] + (f" [{r['variant']}]" if r.get("variant") else "")})
    out = {}
    for name, rows in sorted(groups.items()):
        table = pa.Table.from_pylist([{"method": r["method"], "seed": r["seed"], "success": r["success"]}
                                      for r in rows])
        paired = paired_comparisons(table)
        methods = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            s = np.array([r["success"] for r in mine], float)
            base, _, variant = method.partition(" [")
            where = selections.get(name + (f"/{variant[:-1]}" if variant else ""), {})
            comp = (where.get(base) or {}).get("composition") or {}
            methods[method] = {
                "seeds": len(s), "success_mean": float(s.mean()),
                "success_se": float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else None,
                "selected_fraction": float(np.mean([r["selected_fraction"] for r in mine])),
                "success_share": comp.get("success_share"), "target_failure_share": comp.get("target_failure_share"),
                "vs": paired.get(method, {}),
            }
        proxy = np.array([r["proxy_loss"] for r in rows], float)
        success = np.array([r["success"] for r in rows], float)
        ok = np.isfinite(proxy)
        rho = float(stats.spearmanr(-proxy[ok], success[ok]).statistic) if ok.sum() > 2 else None
        sims = {m: v["success_mean"] for m, v in methods.items() if m in SIMILARITY_METHODS}
        out[name] = {"methods": methods, "policies": int(len(rows)),
                     "best_similarity": max(sims, key=sims.get) if sims else None,
                     "proxy_success_spearman": rho}
    return out


DATAMIL = ("datamodel-regression", "datamodel-metagrad")


def _paired(a: dict[tuple, float], b: dict[tuple, float]) -> dict | None:
    """Mean and 95% t-interval of a - b over the (target, seed) pairs both have."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return None
    d = np.array([a[k] - b[k] for k in keys])
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return {"mean": float(d.mean()), "ci": [float(d.mean() - half), float(d.mean() + half)], "pairs": len(d)}


def across_targets(results: list[dict]) -> dict:
    """Per prior, over the targets every compared method was run on: each method's success averaged
    over targets (each target's mean over its seeds), and the issue's goals as paired differences
    over (target, seed): DataMIL's better estimator (on average) minus the best similarity method
    (on average), IWR minus BR, the best method minus random."""
    by_prior: dict[str, list[dict]] = {}
    for r in results:
        if r.get("prior") is None or r.get("variant") or str(r["task"]).startswith("imbalanced/"):
            continue
        by_prior.setdefault(r["prior"], []).append(r)
    out = {}
    for prior, rows in sorted(by_prior.items()):
        targets = sorted({r["task"] for r in rows})
        per = {}  # method -> {(task, seed): success}
        for r in rows:
            per.setdefault(r["method"], {})[(r["task"], r["seed"])] = r["success"]
        everywhere = [m for m, v in per.items() if {t for t, _ in v} == set(targets)]
        mean = {m: float(np.mean([np.mean([x for (t, _), x in per[m].items() if t == task]) for task in targets]))
                for m in everywhere}
        sims = [m for m in everywhere if m in SIMILARITY_METHODS]
        dms = [m for m in everywhere if m in DATAMIL]
        best_sim = max(sims, key=mean.get) if sims else None
        best_dm = max(dms, key=mean.get) if dms else None
        curation = [m for m in everywhere if m not in ("all", "target_only", "oracle", "random", "random-episode",
                                                       "random-subtraj")]
        best = max(curation, key=mean.get) if curation else None
        out[prior] = {
            "targets": targets, "methods": dict(sorted(mean.items(), key=lambda kv: -kv[1])),
            "best_similarity": best_sim, "best_datamil": best_dm, "best_curation": best,
            "datamil_minus_best_similarity": _paired(per[best_dm], per[best_sim]) if best_dm and best_sim else None,
            "iwr_minus_br": _paired(per["iwr"], per["br"]) if "iwr" in mean and "br" in mean else None,
            "best_minus_random": _paired(per[best], per["random"]) if best and "random" in mean else None,
            "curation_below_random": sorted(m for m in curation if "random" in mean and mean[m] < mean["random"]),
        }
    return out


def markdown_across(across: dict) -> str:
    lines = []
    for prior, a in across.items():
        def d(key, a=a):
            v = a[key]
            return "-" if v is None else f"{v['mean']:+.3f} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}] ({v['pairs']} pairs)"
        lines += [f"**{prior} prior, averaged over {', '.join(a['targets'])}**", "",
                  "| method | mean success over targets |", "|---|---|"]
        lines += [f"| {m} | {v:.3f} |" for m, v in a["methods"].items()]
        lines += ["", f"- DataMIL ({a['best_datamil']}) - best similarity ({a['best_similarity']}): "
                  f"{d('datamil_minus_best_similarity')}",
                  f"- IWR - BR: {d('iwr_minus_br')}",
                  f"- best curation method ({a['best_curation']}) - random: {d('best_minus_random')}",
                  f"- curation methods below random: {', '.join(a['curation_below_random']) or 'none'}", ""]
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    lines = []
    for name, s in summary.items():
        lines += [f"**{name}** ({s['policies']} policies; Spearman of success with the negated proxy "
                  f"{s['proxy_success_spearman']:.2f})", "",
                  "| method | success ± s.e. | vs random [95% CI] | vs best similarity [95% CI] | selected | "
                  "from successful episodes | target failures |", "|---|---|---|---|---|---|---|"]
        for m, v in sorted(s["methods"].items(), key=lambda kv: -kv[1]["success_mean"]):
            def diff(key, v=v):
                d = v["vs"].get(key)
                return f"{d['mean']:+.3f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" if d and d["seeds"] > 1 else "-"
            share = "-" if v["success_share"] is None else f"{v['success_share']:.2f}"
            fail = "-" if v["target_failure_share"] is None else f"{v['target_failure_share']:.2f}"
            se = "" if v["success_se"] is None else f" ± {v['success_se']:.3f}"
            lines.append(f"| {m} | {v['success_mean']:.3f}{se} | {diff('random')} | {diff('best_similarity')} | "
                         f"{v['selected_fraction']:.3f} | {share} | {fail} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "results", "quality_metaworld.json"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_summary.json"))
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    with open(args.results) as f:
        data = json.load(f)
    summary = summarize(data["results"], data.get("selections", {}))
    across = across_targets(data["results"])
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"source": os.path.basename(args.results), "summary": summary, "across_targets": across}, f,
                  indent=1, sort_keys=True)
    os.replace(tmp, args.out)
    if args.markdown:
        print(markdown(summary))
        print(markdown_across(across))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
