"""An HTML report of whatever a store holds: success per method, selections, scores, datamodels.

The page is self-contained (plots embedded as PNG data URIs) so it can be copied out of a
cluster's store or attached to an issue. It reads only committed tables (see docs/store.md):

* ``evals/<run>``               success and proxy loss per (method, task, seed),
* ``selections/<run>``          the prior steps each method selected (composition, overlaps),
* ``scores/<run>``              per-step scores of each scorer (IWR's bandwidth curve in its manifest),
* ``datamodels/<run>/tau``      a datamodel's LDS and split-half reliability (manifest metadata),
* ``sweeps/<run>``              a ``distcur sweep``'s trials (success or proxy per top-x%).

Runs are found by listing these prefixes, whatever their names. A table named ``<E>-<method>``
next to an eval run ``E`` whose rows have that method (what ``distcur demo`` writes) is labelled
``<method>``; any other table is labelled by its own name, which is what ``distcur evaluate``
records as the method of a policy trained on ``selections/<name>``.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distcur import __version__
from distcur.data import eval_key, steps_key
from distcur.stats import format_table, paired_comparisons, percentile_ranks, success_summary
from distcur.store import Manifest, Store

DPI = 160
# Kelly's colours of maximum contrast, the most distinct first; a task (and a method) keeps its
# colour in every plot of a page, and the same names get the same colours on every page.
PALETTE = ("#0067A5", "#F38400", "#008856", "#BE0032", "#875692", "#A1CAF1", "#F3C300", "#848482", "#E68FAC",
           "#882D17", "#8DB600", "#222222", "#F99379", "#C2B280", "#2B3D26", "#B3446C", "#DCD300", "#E25822",
           "#654522", "#F6A600")
FAILURE_COLOURS = ("#BE0032", "#F38400", "#875692", "#848482", "#882D17", "#E68FAC")
OUTCOME_GROUPS = (("other task, successful", False, True), ("other task, failed", False, False),
                  ("target task, successful", True, True), ("target task, failed", True, False))
GROUP_COLOURS = ("#008856", "#BE0032", "#0067A5", "#F38400")


def _png(fig) -> tuple[str, int]:
    """(data URI of the figure at DPI, its width in CSS pixels at print size: 96 per inch)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    width_px = int.from_bytes(buf.getvalue()[16:20], "big")  # the PNG header's IHDR width
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), round(width_px * 96 / DPI)


def _committed(store: Store, prefix: str, tail: str = "") -> list[str]:
    """Names ``n`` under ``prefix`` with a committed table at ``<prefix>/<n><tail>``."""
    return [n for n in store.listdir(prefix) if store.manifest(f"{prefix}/{n}{tail}") is not None]


@dataclass
class Collection:
    """Every committed output of the chosen runs, keyed by the method label it is reported under."""

    evals: dict[str, Manifest] = field(default_factory=dict)  # eval run -> manifest
    rows: list[dict] = field(default_factory=list)  # every eval row, with its "run" and "label"
    scores: dict[str, str] = field(default_factory=dict)  # label -> scores/<run>
    selections: dict[str, str] = field(default_factory=dict)  # label -> selections/<run>
    datamodels: dict[str, str] = field(default_factory=dict)  # label -> datamodels/<run>/tau
    sweeps: dict[str, str] = field(default_factory=dict)  # sweep run -> sweeps/<run>

    @property
    def empty(self) -> bool:
        return not (self.rows or self.scores or self.selections or self.datamodels or self.sweeps)


def collect(store: Store, runs: Sequence[str] | None = None) -> Collection:
    """What the report compares: every run in ``store`` (or those named ``runs``, each also
    taking its ``<run>-<method>`` tables)."""

    def wanted(name: str) -> bool:
        return not runs or any(name == r or name.startswith(f"{r}-") for r in runs)

    col = Collection()
    for run in _committed(store, "evals"):
        if wanted(run):
            col.evals[run] = store.manifest(eval_key(run))
            for r in store.read_table(eval_key(run)).to_pylist():
                col.rows.append({**r, "run": run})
    # The same (task, method) from two eval runs would pool unrelated policies as seeds: keep them apart.
    runs_of: dict[tuple, set[str]] = {}
    for r in col.rows:
        runs_of.setdefault((r.get("task"), r["method"]), set()).add(r["run"])
    for r in col.rows:
        clash = len(runs_of[(r.get("task"), r["method"])]) > 1
        r["label"] = f"{r['method']} [{r['run']}]" if clash else r["method"]
    demo_names = {f"{r['run']}-{r['method']}": r["label"] for r in col.rows}

    for prefix, tail, out in (("scores", "", col.scores), ("selections", "", col.selections),
                              ("datamodels", "/tau", col.datamodels)):
        names = [n for n in _committed(store, prefix, tail) if wanted(n)]
        labels = [demo_names.get(n, n) for n in names]
        for name, label in zip(names, labels):
            out[label if labels.count(label) == 1 else name] = f"{prefix}/{name}{tail}"
    col.sweeps = {n: f"sweeps/{n}" for n in _committed(store, "sweeps") if wanted(n)}
    # Rows written before evaluate recorded the share, or by hand, take it from their selection.
    shares = {label: store.manifest(key).metadata.get("selected_fraction") for label, key in col.selections.items()}
    for r in col.rows:
        if r.get("selected_fraction") is None:
            r["selected_fraction"] = 0.0 if r["method"] == "target_only" else shares.get(r["label"])
    if runs and col.empty:
        found = {p: _committed(store, p, t) for p, t in (("evals", ""), ("scores", ""), ("selections", ""))}
        raise FileNotFoundError(f"runs {list(runs)}: nothing committed under evals/, scores/ or selections/ of "
                                f"{store.uri} is named so (or <run>-*); the store has {found}")
    return col


# -- figures ---------------------------------------------------------------------------------------------


def _style():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
                         "axes.spines.right": False, "figure.constrained_layout.use": True})
    return plt


def _colours(names: Sequence[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(set(names)))}


def success_figure(plt, rows: list[dict], method_colour: dict[str, str]):
    """One panel per task: each seed's success (points), the mean (black bar) and its 95% t-interval."""
    tasks = sorted({r.get("task") or "?" for r in rows})
    summaries = {t: sorted(success_summary([r for r in rows if (r.get("task") or "?") == t], "label"),
                           key=lambda s: -np.nan_to_num(s["success_mean"], nan=-1)) for t in tasks}
    width = max(4.0, 0.42 * max(len(s) for s in summaries.values()) + 1.2)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(width, 3.0 * len(tasks)), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, task in zip(axes[:, 0], tasks):
        summ = summaries[task]
        for i, s in enumerate(summ):
            vals = np.asarray([r["success"] for r in rows if r["label"] == s["method"] and (r.get("task") or "?") == task
                               and r["success"] is not None and np.isfinite(r["success"])], float)
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, s=14, alpha=0.75, color=method_colour[s["method"]],
                       edgecolor="none", zorder=2)
            lo, hi = np.clip(s["success_ci"], 0, 1)  # a rate's interval, drawn within [0, 1]
            if np.isfinite(lo):
                ax.errorbar(i, s["success_mean"], yerr=[[s["success_mean"] - lo], [hi - s["success_mean"]]], fmt="none",
                            ecolor="black", elinewidth=1, capsize=3, zorder=3)
            ax.hlines(s["success_mean"], i - 0.3, i + 0.3, color="black", linewidth=1.6, zorder=3)
        ax.set_xticks(range(len(summ)), [s["method"] for s in summ], rotation=40, ha="right")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlim(-0.6, len(summ) - 0.4)
        ax.set_ylabel("success rate")
        ax.set_xlabel("method")
        ax.set_title(f"target {task}: seeds (points), mean (bar), 95% t-interval", loc="left")
        ax.grid(axis="y", alpha=0.3)
    return fig


def share_figure(plt, rows: list[dict], method_colour: dict[str, str]):
    """Mean success against the share of prior steps each method selected (methods at the same
    share are spread a little sideways so that none hides another)."""
    frac = {}
    for r in rows:
        if r.get("selected_fraction") is not None:
            frac.setdefault(r["label"], []).append(float(r["selected_fraction"]))
    pts = [s for s in success_summary(rows, "label") if s["method"] in frac and np.isfinite(s["success_mean"])]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    at: dict[float, int] = {}
    for s in pts:
        x = round(100 * float(np.mean(frac[s["method"]])), 1)
        k = at[x] = at.get(x, -1) + 1
        lo, hi = np.clip(s["success_ci"], 0, 1)
        yerr = [[s["success_mean"] - lo], [hi - s["success_mean"]]] if np.isfinite(lo) else None
        ax.errorbar(x * 1.04 ** k if x else 0.05 * k, s["success_mean"], yerr=yerr, fmt="o", capsize=3, ms=5,
                    color=method_colour[s["method"]], label=s["method"])
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("selected share of the prior's steps (%)")
    ax.set_ylabel("success rate (mean, 95% t-interval)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return fig


def sweep_figure(plt, table: pa.Table):
    """A sweep's objective against top-x%, one line per scorer (and bandwidth), at its best alpha."""
    rows = table.to_pylist()
    measured = [r for r in rows if r.get("success") is not None]
    metric, best = ("success", max) if measured else ("proxy_loss", min)
    rows = measured or rows
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    lines: dict[str, dict[float, float]] = {}
    for r in rows:
        name = r["method"] + (f" (h={r['bandwidth']})" if r.get("bandwidth") else "")
        pts = lines.setdefault(name, {})
        pts[r["top_percent"]] = best(pts.get(r["top_percent"], r[metric]), r[metric])
    for i, (name, pts) in enumerate(sorted(lines.items())):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], "o-", ms=4, color=PALETTE[i % len(PALETTE)], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("selected top-x% of the prior")
    ax.set_ylabel("success rate" if metric == "success" else "proxy loss (lower is better)")
    ax.set_title(f"best over alpha of {metric.replace('_', ' ')}", loc="left")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return fig


def composition_figure(plt, comps: dict[str, dict], task_colour: dict[str, str], targets: set[str]):
    """Horizontal stacked bars per selection: share of its steps by task (the target task hatched)
    and by episode kind (successful or the failure mode)."""
    methods = list(comps)
    kinds = sorted({k for c in comps.values() for k in c.get("kinds", {})}, key=lambda k: (k != "success", k))
    failures = [k for k in kinds if k != "success"]
    kind_colour = {"success": "#008856", **{k: FAILURE_COLOURS[i % len(FAILURE_COLOURS)] for i, k in enumerate(failures)}}
    height = 0.32 * len(methods) + 1.6
    fig, (ax_t, ax_k) = plt.subplots(1, 2, figsize=(10, height), sharey=True)
    y = np.arange(len(methods))
    tasks = sorted({t for c in comps.values() for t in c.get("tasks", {})}, key=lambda t: (t not in targets, t))
    for ax, names, part, colours in ((ax_t, tasks, "tasks", task_colour), (ax_k, kinds, "kinds", kind_colour)):
        left = np.zeros(len(methods))
        for name in names:
            vals = np.array([comps[m].get(part, {}).get(name, 0.0) for m in methods])
            is_target = part == "tasks" and name in targets
            ax.barh(y, vals, left=left, color=colours[name], edgecolor="black" if is_target else "white",
                    hatch="///" if is_target else None, linewidth=0.6,
                    label=f"{name} (target)" if is_target else name)
            left += vals
        for i, m in enumerate(methods):
            if not comps[m].get("selected_steps"):
                ax.text(0.01, i, "no prior data (target demos only)", va="center", fontsize=7, color="#444")
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the selection's steps")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    ax_t.set_yticks(y, methods)
    ax_t.invert_yaxis()  # shared: the first selection on top in both panels
    ax_t.set_title("by task (target task hatched)", loc="left")
    ax_k.set_title("by episode outcome / failure mode", loc="left")
    return fig


def scores_figure(plt, groups: dict[str, dict[str, np.ndarray]]):
    """Per scorer, box plots of its scores' percentile ranks by episode outcome and target task vs other."""
    methods = list(groups)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 1.5), 3.8))
    # only the groups some scorer has steps of (the hard prior has no successful target-task episode)
    present = [(name, colour) for (name, _, _), colour in zip(OUTCOME_GROUPS, GROUP_COLOURS)
               if any(len(groups[m].get(name, ())) for m in methods)]
    w = 0.8 / max(len(present), 1)
    for g, (name, colour) in enumerate(present):
        pos, data = [], []
        for i, m in enumerate(methods):
            vals = groups[m].get(name)
            if vals is not None and len(vals):
                pos.append(i + (g - (len(present) - 1) / 2) * w)
                data.append(vals)
        if data:
            bp = ax.boxplot(data, positions=pos, widths=w * 0.9, showfliers=False, patch_artist=True,
                            medianprops={"color": "black"})
            for box in bp["boxes"]:
                box.set(facecolor=colour, alpha=0.8)
            ax.plot([], [], "s", color=colour, label=name)
    ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right")
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score percentile within the method (%)")
    ax.set_xlabel("scorer")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def proxy_figure(plt, rows: list[dict], method_colour: dict[str, str]):
    """Every policy's proxy loss against its success, with the Spearman correlation."""
    from scipy.stats import spearmanr

    pts = [r for r in rows if r.get("proxy_loss") is not None and r.get("success") is not None
           and np.isfinite(r["proxy_loss"]) and np.isfinite(r["success"])]
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label in dict.fromkeys(r["label"] for r in pts):
        sub = [r for r in pts if r["label"] == label]
        ax.scatter([r["proxy_loss"] for r in sub], [r["success"] for r in sub], s=18, color=method_colour[label],
                   label=label)
    success = [r["success"] for r in pts]
    rho = spearmanr([r["proxy_loss"] for r in pts], success).statistic if len(set(success)) > 1 else float("nan")
    ax.set_xlabel("proxy loss (BC NLL, nats per step; lower is better)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.03, 1.03)
    corr = f"{rho:+.2f}" if np.isfinite(rho) else "undefined (every policy has the same success)"
    ax.set_title(f"{len(pts)} policies; Spearman(proxy, success) = {corr}", loc="left")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return fig


def jaccard_figure(plt, overlaps: dict[str, dict[str, float]]):
    names = list(overlaps)
    m = np.array([[1.0 if a == b else overlaps[a].get(b, np.nan) for b in names] for a in names])
    size = 0.45 * len(names) + 1.8
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("selection")
    ax.set_ylabel("selection")
    fig.colorbar(im, ax=ax, label="Jaccard index of the selected step sets", shrink=0.8)
    return fig


def datamodel_figure(plt, stats: dict[str, dict]):
    names = [n for n, s in stats.items() if s.get("lds") is not None or s.get("tau_split_half_spearman") is not None]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(names) + 1.5), 3.2))
    x = np.arange(len(names))
    for k, (key, label, colour) in enumerate((("lds", "LDS (held-out subsets)", "#0072B2"),
                                               ("tau_split_half_spearman", "split-half Spearman of tau", "#E69F00"),
                                               ("tau_top10_overlap", "split-half top-10% overlap", "#009E73"))):
        vals = [stats[n].get(key) for n in names]
        ax.bar(x + (k - 1) * 0.26, [np.nan if v is None else v for v in vals], 0.25, label=label, color=colour)
    ax.set_xticks(x, names)
    ax.set_xlabel("datamodel run")
    ax.set_ylabel("Spearman / overlap")
    ax.set_ylim(min(0, *[stats[n].get(k) or 0 for n in names for k in ("lds", "tau_split_half_spearman")]), 1)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def bandwidth_figure(plt, curves: dict[str, dict]):
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (name, bw) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        ax.plot(bw["grid"], bw["heldout_loglik"], "o-", ms=3, color=colour, label=name)
        if bw.get("h_target") is not None:
            ax.axvline(bw["h_target"], color=colour, linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("target KDE bandwidth (whitened units; dashed: chosen)")
    ax.set_ylabel("held-out mean log-likelihood")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return fig


# -- data for the figures --------------------------------------------------------------------------------


def _step_outcomes(store: Store, source: str, cache: dict) -> pa.Table:
    if source not in cache:
        cache[source] = store.read_table(steps_key(source), columns=["source", "episode", "step", "task", "success"])
    return cache[source]


def score_groups(store: Store, key: str, targets: set[str], cache: dict) -> dict[str, np.ndarray]:
    """{outcome group: percentile ranks of the scores of its steps} for ``scores/<run>``."""
    scores = store.read_table(key, columns=["source", "episode", "step", "score"])
    pct = percentile_ranks(np.nan_to_num(scores.column("score").to_numpy(zero_copy_only=False), nan=-np.inf))
    scores = scores.append_column("pct", pa.array(pct))
    sources = pc.unique(scores.column("source")).to_pylist()
    steps = pa.concat_tables([_step_outcomes(store, s, cache) for s in sources
                              if store.manifest(steps_key(s)) is not None])
    joined = scores.join(steps, ["source", "episode", "step"], join_type="inner")
    is_target = np.isin(np.asarray(joined.column("task").to_pylist(), dtype=object), list(targets))
    success = joined.column("success").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    p = joined.column("pct").to_numpy()
    return {name: p[(is_target == t) & (success == s)] for name, t, s in OUTCOME_GROUPS}


def git_commit() -> str:
    """The distcur checkout's commit (``+dirty`` with uncommitted changes), or a reason there is none."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def _figure(title: str, png: tuple[str, int], caption: str) -> str:
    src, width = png
    return (f"<figure><img src=\"{src}\" alt=\"{html.escape(title)}\" style=\"width:{width}px\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def build_report(store: Store, runs: str | Sequence[str] | None = None) -> str:
    """The HTML page comparing ``runs`` (a name, names, or None for every run) in ``store``."""
    runs = [runs] if isinstance(runs, str) else list(runs or [])
    col = collect(store, runs)
    if col.empty:
        raise FileNotFoundError(f"{store.uri} has no committed evals, scores, selections or datamodels to report on")
    plt = _style()
    rows = col.rows
    targets = {r["task"] for r in rows if r.get("task")}
    sel_meta = {label: store.manifest(key) for label, key in col.selections.items()}
    targets |= {m.metadata["target"] for m in sel_meta.values() if m.metadata.get("target")}
    method_colour = _colours([r["label"] for r in rows] + list(col.selections) + list(col.scores))

    title = ", ".join(runs) if runs else "every run"
    sections = [f"<h1>distcur report: {html.escape(title)}</h1>", _provenance(store, col, targets)]

    if rows:
        sections.append("<h2>Success</h2>")
        proxy_only = sorted({f"{r['label']} on {r.get('task')}" for r in rows if r.get("evaluation") == "proxy-only"})
        if proxy_only:
            sections.append("<p><b>Proxy-only evaluation</b> (no simulator, or no rollouts asked for): success was not "
                            "measured for " + html.escape(", ".join(proxy_only)) + "; compare these by their proxy "
                            "loss only.</p>")
        sections.append(_figure("success per method", _png(success_figure(plt, rows, method_colour)),
                                "Rollout success per method: each point is one seed's policy, the bar its mean, the "
                                "whiskers the 95% t-interval over seeds (drawn within [0, 1]; with 2 seeds it is "
                                "12.7 standard errors wide on each side)."))
        summary = success_summary(rows, "label")
        sections.append("<pre>" + html.escape(format_table(summary, paired_comparisons(rows, "label"))) + "</pre>")
        fig = share_figure(plt, rows, method_colour)
        if fig is not None:
            sections.append(_figure("success against selected share", _png(fig),
                                    "Mean success against the share of the prior's steps each method trained on."))
        fig = proxy_figure(plt, rows, method_colour)
        if fig is not None:
            sources = sorted({str(r.get("proxy_source")) for r in rows if r.get("proxy_source")})
            where = f" Proxy demos: {', '.join(sources)}." if sources else ""
            sections.append("<h2>Proxy</h2>" + _figure(
                "proxy against success", _png(fig),
                "Each policy's BC loss on target demos (the datamodels' proxy) against its rollout success." + where))

    comps = {label: m.metadata.get("composition") for label, m in sel_meta.items() if m.metadata.get("composition")}
    if len(targets) == 1:  # a selection whose scores did not name the target counted no target-task steps
        from distcur.composition import selection_composition

        for label, m in sel_meta.items():
            if label in comps and not m.metadata.get("target") and comps[label].get("selected_steps"):
                sel = store.read_table(col.selections[label], columns=["source", "episode", "step"])
                comps[label] = selection_composition(store, sel, next(iter(targets)))
    for label in dict.fromkeys(r["label"] for r in rows):
        if label not in comps and label.split(" [")[0] == "target_only":
            comps[label] = {"selected_steps": 0, "tasks": {}, "kinds": {}}
    if comps:
        task_names = {t for c in comps.values() for t in c.get("tasks", {})} | targets
        fig = composition_figure(plt, comps, _colours(task_names), targets)
        sections.append("<h2>Selections</h2>" + _figure(
            "selection composition", _png(fig),
            "What each selection is made of: share of its prior steps per task (target task hatched) and per "
            "episode kind (successful demos or the failure mode recorded at ingest)."))
        sections.append(_composition_table(comps, sel_meta))
        tables = {label: store.read_table(key, columns=["source", "episode", "step"])
                  for label, key in col.selections.items() if label.split(" [")[0] != "all"}
        if len(tables) >= 2:
            from distcur.composition import pairwise_jaccard

            sections.append(_figure("selection overlap", _png(jaccard_figure(plt, pairwise_jaccard(tables))),
                                    "Overlap of the methods' selections (Jaccard index of their prior step sets)."))

    if col.scores:
        cache: dict = {}
        groups = {label: score_groups(store, key, targets, cache) for label, key in sorted(col.scores.items())}
        sections.append("<h2>Scores</h2>" + _figure(
            "score distributions", _png(scores_figure(plt, groups)),
            "Each scorer's per-step scores as percentiles within that scorer (a common scale for log-weights, "
            "similarities and datamodel scores), split by the episode's outcome and by target task vs other."))
        curves = {}
        for label, key in col.scores.items():
            bw = store.manifest(key).metadata.get("bandwidth") or {}
            if isinstance(bw, dict) and bw.get("grid") and bw.get("heldout_loglik"):
                curves[label] = bw
        if curves:
            sections.append(_figure("IWR bandwidth", _png(bandwidth_figure(plt, curves)),
                                    "IWR's held-out likelihood of the target embedding over the bandwidth grid."))

    if col.datamodels:
        stats = {label: {**(store.manifest(col.scores[label]).metadata if label in col.scores else {}),
                         **store.manifest(key).metadata} for label, key in col.datamodels.items()}
        fig = datamodel_figure(plt, stats)
        sections.append("<h2>Datamodels</h2>" + (_figure(
            "datamodel reliability", _png(fig),
            "Linear datamodeling score on held-out subsets, and agreement of tau fitted on two disjoint halves of "
            "the subset models.") if fig is not None else "") + _datamodel_table(stats))

    for name, key in col.sweeps.items():
        sections.append(f"<h2>Sweep <code>{html.escape(name)}</code></h2>" + _figure(
            f"sweep {name}", _png(sweep_figure(plt, store.read_table(key))),
            "Each trial's objective (rollout success when measured, else the held-out proxy loss) per top-x%."))

    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
             "figure{margin:1.5em 0}img{max-width:100%;height:auto;display:block}"
             "figcaption{font-size:0.9em;color:#333;margin-top:0.3em}pre{overflow-x:auto;font-size:0.85em}"
             "table{border-collapse:collapse;font-size:0.9em;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:2px 6px;text-align:right}th:first-child,td:first-child{text-align:left}table.meta td{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>distcur report: {html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")


def _provenance(store: Store, col: Collection, targets: set[str]) -> str:
    """Where the page comes from: store, distcur version and commit, seeds, every eval run's config."""
    seeds = sorted({int(r["seed"]) for r in col.rows if r.get("seed") is not None})
    items = [("store", store.uri), ("distcur", f"{__version__}, commit {git_commit()}"),
             ("generated", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
             ("target tasks", ", ".join(sorted(targets)) or "-"), ("seeds", ", ".join(map(str, seeds)) or "-")]
    out = "<table class='meta'>" + "".join(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in items) + "</table>"
    for run, m in col.evals.items():
        wall = (m.metadata.get("timings_s") or {}).get("total", m.wall_s)  # the demo's whole run, when it says
        made = f"distcur {m.distcur_version}, stage {m.stage}, {m.rows} rows, {wall:.0f} s"
        out += (f"<details><summary>eval run <code>{html.escape(run)}</code> ({html.escape(made)}): config"
                f"</summary><pre>{html.escape(json.dumps(m.config, indent=1, sort_keys=True, default=str))}</pre>"
                "</details>")
    return out


def _composition_table(comps: dict[str, dict], sel_meta: dict[str, Manifest]) -> str:
    head = ("<table><tr><th>selection</th><th>level</th><th>prior share</th><th>steps</th><th>successful</th>"
            "<th>target task</th><th>target failures</th></tr>")
    body = ""
    for label, c in comps.items():
        m = sel_meta.get(label)
        frac = m.metadata.get("selected_fraction") if m else 0.0
        level = (m.config.get("level") if m else None) or "-"
        body += (f"<tr><td>{html.escape(label)}</td><td>{html.escape(str(level))}</td>"
                 f"<td>{100 * (frac or 0):.1f}%</td><td>{c.get('selected_steps', 0)}</td>"
                 + "".join(f"<td>{100 * c.get(k, 0.0):.0f}%</td>"
                           for k in ("success_share", "target_task_share", "target_failure_share")) + "</tr>")
    return head + body + "</table>"


def _datamodel_table(stats: dict[str, dict]) -> str:
    keys = ("lds", "tau_split_half_spearman", "tau_top10_overlap", "clusters", "iterations")
    head = "<table><tr><th>datamodel</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    def cell(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))
    return head + "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{cell(s.get(k))}</td>" for k in keys)
                          + "</tr>" for n, s in stats.items()) + "</table>"


def report_name(runs: str | Sequence[str] | None) -> str:
    """``reports/<name>.html``'s name: the runs joined by ``+``, or ``store`` for every run."""
    runs = [runs] if isinstance(runs, str) else list(runs or [])
    return "+".join(r.replace("/", "_") for r in runs) or "store"


def write_report(store: Store, runs: str | Sequence[str] | None = None, out_path: str | None = None) -> str:
    """Build the report; write it to ``out_path`` (local) or ``reports/<name>.html`` in the store."""
    page = build_report(store, runs)
    if out_path:
        with open(out_path, "w") as f:
            f.write(page)
        return out_path
    key = f"reports/{report_name(runs)}.html"
    store.write_text(key, page)
    return store.uri_of(key)
