"""The comparison's statistics: success per method over seeds, paired differences, the printed table.

Every comparison is over the same seeds (each method's policies share initial weights, batches' seed
and rollout states per seed), so two methods are compared by the mean of their per-seed difference,
its standard error and its t-interval.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distcur import methods as registry


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Two-sided ``level`` t-interval of the mean of ``x`` (n - 1 degrees of freedom); NaNs for n < 2."""
    from scipy import stats

    x = np.asarray(x, float)
    if len(x) < 2:
        return float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1)) * float(x.std(ddof=1) / np.sqrt(len(x)))
    return float(x.mean() - half), float(x.mean() + half)


def success_summary(results: pa.Table | list[dict], key: str = "method") -> list[dict]:
    """Mean, standard error and 95% t-interval (over seeds) of success, and mean proxy loss, per
    ``key`` (a column of the eval rows)."""
    rows = results.to_pylist() if isinstance(results, pa.Table) else results
    out = []
    for name in dict.fromkeys(r[key] for r in rows):
        sub = [r for r in rows if r[key] == name]
        s = np.asarray([r["success"] for r in sub], float)
        s = s[np.isfinite(s)]
        proxy = np.asarray([np.nan if r.get("proxy_loss") is None else r["proxy_loss"] for r in sub], float)
        se = float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan")
        out.append({"method": name, "seeds": int(len(s)), "success_mean": float(s.mean()) if len(s) else float("nan"),
                    "success_se": se, "success_ci": list(t_interval(s)),
                    "proxy_loss": float(np.nanmean(proxy)) if np.isfinite(proxy).any() else float("nan")})
    return out


SIMILARITY_METHODS = registry.names(similarity=True)


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict:
    """Mean of ``a[s] - b[s]`` over the seeds both have, its standard error and the two-sided
    ``level`` t-interval (n - 1 degrees of freedom): the comparison of two methods trained and
    evaluated on the same seeds (same initial weights and batches' seed, same rollout states)."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], float)
    if len(d) < 2:
        return {"seeds": len(d), "mean": float(d.mean()) if len(d) else float("nan"), "se": float("nan"),
                "ci": [float("nan"), float("nan")]}
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    return {"seeds": len(d), "mean": float(d.mean()), "se": se, "ci": list(t_interval(d, level))}


def paired_comparisons(results: pa.Table | list[dict], key: str = "method") -> dict[str, dict[str, dict]]:
    """Per method: :func:`paired_difference` to ``random`` and to the best similarity method (the
    one of SR / AR / BR / STRAP / IWR with the highest mean success), where those ran."""
    rows = results.to_pylist() if isinstance(results, pa.Table) else results
    by_method: dict[str, dict[int, float]] = {}
    for r in rows:
        by_method.setdefault(r[key], {})[int(r["seed"])] = float(r["success"])
    means = {m: float(np.mean(list(v.values()))) for m, v in by_method.items()}
    refs = {}
    if "random" in by_method:
        refs["random"] = "random"
    sims = [m for m in SIMILARITY_METHODS if m in by_method]
    if sims:
        refs["best_similarity"] = max(sims, key=lambda m: means[m])
    return {m: {name: {"reference": ref, **paired_difference(v, by_method[ref])} for name, ref in refs.items()}
            for m, v in by_method.items()}


def _proxy_cell(value: float) -> str:
    """12 characters: fixed point, or exponent notation when the value would not fit (an NLL that
    blew up on a policy trained on 5 demos)."""
    return f"{value:>12.3f}" if abs(value) < 1e6 else f"{value:>12.3g}"


def format_table(rows: list[dict], paired: dict[str, dict[str, dict]] | None = None) -> str:
    """The comparison table as fixed-width text (what ``distcur demo`` prints); with ``paired``
    (:func:`paired_comparisons`), each method's difference to random and to the best similarity
    method, with its 95% interval."""
    paired = paired or {}
    refs = next(iter(paired.values()), {})
    head = f"{'method':<24}{'success':>10}{'± s.e.':>9}{'seeds':>7}{'proxy (nll)':>12}"
    for name, d in refs.items():
        head += f"{'vs ' + (d['reference'] if name == 'random' else 'best sim (' + d['reference'] + ')'):>30}"
    lines = [head]
    for r in sorted(rows, key=lambda r: -r["success_mean"]):
        line = f"{r['method']:<24}{r['success_mean']:>10.3f}{r['success_se']:>9.3f}{r['seeds']:>7d}{_proxy_cell(r['proxy_loss'])}"
        for name in refs:
            d = paired.get(r["method"], {}).get(name)
            cell = f"{d['mean']:+.3f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" if d and d["seeds"] >= 2 else "-"
            line += f"{cell:>30}"
        lines.append(line)
    return "\n".join(lines)


def percentile_ranks(x: np.ndarray) -> np.ndarray:
    """(N,) percentile of each score within its own table, 0..100 (ties share their mean rank): the
    common scale on which IWR's log-weights, similarities and datamodel scores can be compared."""
    from scipy.stats import rankdata

    x = np.asarray(x, float)
    return (rankdata(x) - 0.5) / len(x) * 100 if len(x) else x
