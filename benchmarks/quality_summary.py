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

from distcur.report import SIMILARITY_METHODS, paired_comparisons

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
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"source": os.path.basename(args.results), "summary": summary}, f, indent=1, sort_keys=True)
    os.replace(tmp, args.out)
    if args.markdown:
        print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
