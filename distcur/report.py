"""An HTML report of one pipeline run: score histograms, selection composition, success per method.

The page is self-contained (plots embedded as PNG data URIs) so it can be copied out of a
cluster's store or attached to an issue. It reads only what the run committed to the store:

* ``scores/<run>-<method>``     per-step scores of each scorer,
* ``selections/<run>-<method>`` the selection each method made,
* ``evals/<run>``               success and proxy loss per (method, seed).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distcur.data import STEPS_PREFIX, eval_key, list_sources, steps_key
from distcur.store import Store


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_keys(store: Store, prefix: str, run: str) -> dict[str, str]:
    """{method: key} of the committed tables ``<prefix>/<run>-<method>``."""
    out = {}
    for name in store.listdir(prefix):
        if name.startswith(f"{run}-") and store.manifest(f"{prefix}/{name}") is not None:
            out[name[len(run) + 1 :]] = f"{prefix}/{name}"
    return out


def success_summary(results: pa.Table) -> list[dict]:
    """Mean and standard error (over seeds) of success and proxy loss per method."""
    rows = []
    methods = results.column("method").to_pylist()
    for method in dict.fromkeys(methods):
        sub = results.filter(pc.equal(results.column("method"), method))
        s = np.asarray(sub.column("success").to_pylist(), float)
        proxy = np.asarray([np.nan if v is None else v for v in sub.column("proxy_loss").to_pylist()], float)
        se = float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan")
        rows.append(
            {
                "method": method,
                "seeds": int(len(s)),
                "success_mean": float(s.mean()),
                "success_se": se,
                "proxy_loss": float(np.nanmean(proxy)) if np.isfinite(proxy).any() else float("nan"),
            }
        )
    return rows


SIMILARITY_METHODS = ("sr", "ar", "br", "strap", "iwr")


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict:
    """Mean of ``a[s] - b[s]`` over the seeds both have, its standard error and the two-sided
    ``level`` t-interval (n - 1 degrees of freedom): the comparison of two methods trained and
    evaluated on the same seeds (same initial weights and batches' seed, same rollout states)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], float)
    if len(d) < 2:
        return {"seeds": len(d), "mean": float(d.mean()) if len(d) else float("nan"), "se": float("nan"),
                "ci": [float("nan"), float("nan")]}
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * se
    return {"seeds": len(d), "mean": float(d.mean()), "se": se, "ci": [float(d.mean() - half), float(d.mean() + half)]}


def paired_comparisons(results: pa.Table) -> dict[str, dict[str, dict]]:
    """Per method: :func:`paired_difference` to ``random`` and to the best similarity method (the
    one of SR / AR / BR / STRAP / IWR with the highest mean success), where those ran."""
    by_method: dict[str, dict[int, float]] = {}
    for r in results.to_pylist():
        by_method.setdefault(r["method"], {})[int(r["seed"])] = float(r["success"])
    means = {m: float(np.mean(list(v.values()))) for m, v in by_method.items()}
    refs = {}
    if "random" in by_method:
        refs["random"] = "random"
    sims = [m for m in SIMILARITY_METHODS if m in by_method]
    if sims:
        refs["best_similarity"] = max(sims, key=lambda m: means[m])
    return {m: {name: {"reference": ref, **paired_difference(v, by_method[ref])} for name, ref in refs.items()}
            for m, v in by_method.items()}


def format_table(rows: list[dict], paired: dict[str, dict[str, dict]] | None = None) -> str:
    """The comparison table as fixed-width text (what ``distcur demo`` prints); with ``paired``
    (:func:`paired_comparisons`), each method's difference to random and to the best similarity
    method, with its 95% interval."""
    paired = paired or {}
    refs = next(iter(paired.values()), {})
    head = f"{'method':<24}{'success':>10}{'± s.e.':>9}{'seeds':>7}{'proxy loss':>12}"
    for name, d in refs.items():
        head += f"{'vs ' + (d['reference'] if name == 'random' else 'best sim (' + d['reference'] + ')'):>30}"
    lines = [head]
    for r in sorted(rows, key=lambda r: -r["success_mean"]):
        line = f"{r['method']:<24}{r['success_mean']:>10.3f}{r['success_se']:>9.3f}{r['seeds']:>7d}{r['proxy_loss']:>12.3f}"
        for name in refs:
            d = paired.get(r["method"], {}).get(name)
            cell = f"{d['mean']:+.3f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" if d and d["seeds"] >= 2 else "-"
            line += f"{cell:>30}"
        lines.append(line)
    return "\n".join(lines)


def build_report(store: Store, run: str) -> str:
    """The HTML page for ``run`` in ``store``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections: list[str] = [f"<h1>distcur run <code>{html.escape(run)}</code></h1>",
                           f"<p>store: <code>{html.escape(store.uri)}</code></p>"]

    evals = store.manifest(eval_key(run))
    if evals is not None:
        rows = success_summary(store.read_table(eval_key(run)))
        rows.sort(key=lambda r: -r["success_mean"])
        fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(rows)), 3.2))
        ax.bar([r["method"] for r in rows], [r["success_mean"] for r in rows],
               yerr=[0 if np.isnan(r["success_se"]) else r["success_se"] for r in rows], capsize=3, color="#4c72b0")
        ax.set_ylabel("success rate")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=45)
        ax.set_title("success per method (mean ± s.e. over seeds)")
        sections.append("<h2>Success</h2>" + f'<img src="{_png(fig)}">')
        sections.append("<pre>" + html.escape(format_table(rows)) + "</pre>")

    scores = run_keys(store, "scores", run)
    if scores:
        n = len(scores)
        fig, axes = plt.subplots(1, n, figsize=(3 * n, 2.6), squeeze=False)
        for ax, (method, key) in zip(axes[0], sorted(scores.items())):
            s = store.read_table(key, columns=["score"]).column("score").to_numpy()
            s = s[np.isfinite(s)]
            ax.hist(s, bins=50, color="#55a868")
            ax.set_title(method, fontsize=9)
            ax.set_yscale("log")
        fig.suptitle("score histograms (per step)")
        sections.append("<h2>Scores</h2>" + f'<img src="{_png(fig)}">')

    selections = run_keys(store, "selections", run)
    if selections:
        task_of = _episode_tasks(store)
        comp: dict[str, dict[str, float]] = {}
        for method, key in sorted(selections.items()):
            sel = store.read_table(key, columns=["source", "episode", "weight"])
            keys = zip(sel.column("source").to_pylist(), sel.column("episode").to_pylist())
            weights = sel.column("weight").to_numpy()
            totals: dict[str, float] = {}
            for (src, ep), w in zip(keys, weights):
                task = task_of.get((src, ep), src)
                totals[task] = totals.get(task, 0.0) + float(w)
            total = sum(totals.values()) or 1.0
            comp[method] = {t: v / total for t, v in totals.items()}
        tasks = sorted({t for c in comp.values() for t in c})
        fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(comp)), 3.6))
        bottom = np.zeros(len(comp))
        cmap = plt.get_cmap("tab20")
        for i, task in enumerate(tasks):
            vals = np.array([comp[m].get(task, 0.0) for m in comp])
            ax.bar(list(comp), vals, bottom=bottom, label=task, color=cmap(i % 20))
            bottom += vals
        ax.set_ylabel("share of selected weight")
        ax.tick_params(axis="x", rotation=45)
        ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
        ax.set_title("selected data by task")
        sections.append("<h2>Selections</h2>" + f'<img src="{_png(fig)}">')

    if len(sections) == 2:
        raise FileNotFoundError(f"run {run!r} has no evals, scores or selections in {store.uri}")
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>distcur {html.escape(run)}</title>" \
           f"<style>{style}</style></head><body>{''.join(sections)}</body></html>"


def _episode_tasks(store: Store) -> dict[tuple[str, int], str]:
    """(source, episode) -> task, from the step tables' first steps."""
    out: dict[tuple[str, int], str] = {}
    if not store.listdir(STEPS_PREFIX):
        return out
    for source in list_sources(store):
        for batch in store.iter_batches(steps_key(source), columns=["episode", "task", "is_first"]):
            first = batch.column(2).to_numpy(zero_copy_only=False)
            eps = batch.column(0).to_numpy()[first]
            tasks = np.asarray(batch.column(1).to_pylist(), dtype=object)[first]
            out.update({(source, int(e)): str(t) for e, t in zip(eps, tasks)})
    return out


def write_report(store: Store, run: str, out_path: str | None = None) -> str:
    """Build the report; write it to ``out_path`` (local) or ``reports/<run>.html`` in the store."""
    page = build_report(store, run)
    if out_path:
        with open(out_path, "w") as f:
            f.write(page)
        return out_path
    store.write_text(f"reports/{run}.html", page)
    return store.uri_of(f"reports/{run}.html")

