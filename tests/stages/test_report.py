"""The report on a store built by hand: runs found whatever their names, every section drawn;
``distcur evaluate`` adding a method's rows; the proxy's demos held out unless asked."""

from __future__ import annotations

import base64
import logging
import re
import struct
import time
import types

import numpy as np
import pyarrow as pa
import pytest

from distcur.cli import main
from distcur.commands import evaluate as evaluate_cmd
from distcur.data import eval_key, scores_key, selection_key, steps_key
from distcur.schema import SCORE_SCHEMA, SELECTION_SCHEMA, steps_table
from distcur.select import selection_metadata
from distcur.stages.report import DPI, build_report, collect, write_report
from distcur.stats import percentile_ranks
from distcur.store import Store

TARGET = "reach"


def _selection(store: Store, run: str, episodes: list[int]) -> None:
    rows = [(e, s) for e in episodes for s in range(10)]
    table = pa.Table.from_arrays([pa.array(["prior"] * len(rows)), pa.array([e for e, _ in rows], pa.int64()),
                                  pa.array([s for _, s in rows], pa.int32()), pa.array(np.ones(len(rows)), pa.float32())],
                                 schema=SELECTION_SCHEMA)
    store.write_table(selection_key(run), table, "select", {"level": "episode"},
                      metadata={"target": TARGET, **selection_metadata(store, table, 40, TARGET)})


def _scores(store: Store, run: str, score: np.ndarray, metadata: dict | None = None) -> None:
    ep, st = np.repeat(np.arange(4), 10), np.tile(np.arange(10), 4)
    store.write_table(scores_key(run), pa.Table.from_arrays(
        [pa.array(["prior"] * 40), pa.array(ep, pa.int64()), pa.array(st, pa.int32()), pa.array(score, pa.float64()),
         pa.array([run] * 40)], schema=SCORE_SCHEMA), "score", {}, metadata=metadata or {})


def _evals(store: Store, run: str, methods: list[str]) -> None:
    rows = [{"method": m, "task": TARGET, "seed": s, "episodes": 10, "success": 0.1 * (i + s), "proxy_loss": 1.0 + i,
             "proxy_source": "target-reach-heldout", "policy": f"p-{m}"}
            for i, m in enumerate(methods) for s in range(3)]
    store.write_table(eval_key(run), pa.Table.from_pylist(rows), "evaluate", {"methods": methods})


def build_store(path) -> Store:
    """Four 10-step prior episodes (0 a successful and 1 a failed target-task attempt, 2 and 3 the
    same of 'push'); what the CLI writes (``scores/iwr``, ``selections/iwr``, ``selections/br``,
    ``evals/results``) next to what the demo writes (``evals/demo`` with ``demo-<method>`` tables)."""
    s = Store(path)
    ep, step = np.repeat(np.arange(4), 10), np.tile(np.arange(10), 4)
    s.write_table(steps_key("prior"), steps_table({
        "source": "prior", "episode": ep, "step": step, "task": np.where(ep < 2, TARGET, "push").astype(object),
        "state": np.zeros((40, 2)), "action": np.zeros((40, 1)), "is_first": step == 0, "is_last": step == 9,
        "is_terminal": step == 9, "success": np.isin(ep, [0, 2])}), "ingest", {},
        metadata={"episode_modes": ["success", "noisy", "success", "other_expert"]})
    _scores(s, "iwr", np.linspace(-50, 3, 40), {"method": "iwr", "bandwidth": {
        "rule": "likelihood", "grid": [0.1, 0.2, 0.4], "heldout_loglik": [-3.0, -1.0, -2.0], "h_target": 0.2}})
    _selection(s, "iwr", [0])
    _selection(s, "br", [1])
    _evals(s, "results", ["iwr", "br"])
    _scores(s, "demo-sr", np.linspace(0, 1, 40))
    _selection(s, "demo-sr", [2])
    _evals(s, "demo", ["sr", "target_only"])
    s.write_table("datamodels/dm/tau", pa.table({"tau": [0.1, 0.2]}), "datamodel-tau", {},
                  metadata={"lds": 0.4, "tau_split_half_spearman": 0.55, "tau_top10_overlap": 0.5})
    s.write_table("sweeps/sw", pa.Table.from_pylist([
        {"method": m, "bandwidth": None, "top_percent": t, "alpha": a, "proxy_loss": 1.0 / t + a, "success": None}
        for m in ("iwr", "br") for t in (5.0, 10.0, 20.0) for a in (0.3, 0.5)]), "sweep", {})
    return s


@pytest.fixture
def store(tmp_path):
    return build_store(tmp_path / "store")


def test_collect_finds_every_run_whatever_its_name(store):
    col = collect(store)
    assert set(col.evals) == {"results", "demo"}
    assert {r["label"] for r in col.rows} == {"iwr", "br", "sr", "target_only"}
    # the demo's <run>-<method> tables are labelled by method, the CLI's by their own names
    assert col.selections == {"iwr": "selections/iwr", "br": "selections/br", "sr": "selections/demo-sr"}
    assert col.scores == {"iwr": "scores/iwr", "sr": "scores/demo-sr"}
    assert col.datamodels == {"dm": "datamodels/dm/tau"} and col.sweeps == {"sw": "sweeps/sw"}
    only = collect(store, ["demo"])
    assert set(only.evals) == {"demo"} and only.selections == {"sr": "selections/demo-sr"}


def test_same_method_in_two_eval_runs_is_kept_apart(store):
    _evals(store, "again", ["iwr"])
    labels = {r["label"] for r in collect(store).rows}
    assert {"iwr [results]", "iwr [again]", "br"} <= labels


def test_unknown_run_names_what_is_there(store):
    with pytest.raises(FileNotFoundError, match=r"runs \['nope'\].*results"):
        collect(store, ["nope"])


def test_composition_counts_the_target_when_the_scores_did_not_name_it(store):
    """IWR's scores record no target: its selection's manifest counts no target-task step, the report does."""
    table = store.read_table(selection_key("br"))  # episode 1: the target task's failed attempt
    store.write_table(selection_key("nameless"), table, "select", {"level": "episode"},
                      metadata=selection_metadata(store, table, 40, None))
    page = build_report(store, ["nameless", "results"])
    assert re.search(r"<td>nameless</td><td>episode</td><td>25.0%</td><td>10</td><td>0%</td><td>100%</td>"
                     r"<td>100%</td>", page)


def _png_size(uri: str) -> tuple[int, int]:
    data = base64.b64decode(uri.split(",", 1)[1])
    return struct.unpack(">II", data[16:24])


def test_report_draws_every_section(store):
    page = build_report(store)
    for heading in ("Success", "Proxy", "Selections", "Scores", "Datamodels"):
        assert f"<h2>{heading}</h2>" in page
    images = re.findall(r'<img src="(data:image/png;base64,[^"]+)" alt="([^"]+)"', page)
    alts = {alt for _, alt in images}
    assert {"success per method", "success against selected share", "proxy against success", "selection composition",
            "selection overlap", "score distributions", "IWR bandwidth", "datamodel reliability", "sweep sw"} <= alts
    assert all(min(_png_size(uri)) > 300 for uri, _ in images)  # drawn at DPI, not thumbnails
    assert DPI >= 150
    assert "commit" in page and "seeds</th><td>0, 1, 2" in page and "target tasks</th><td>reach" in page
    assert "<td>target_only</td>" in page  # in the composition too, as a selection of no prior data


def test_report_cli_without_runs_writes_into_the_store(store, capsys):
    assert main(["report", "--store", store.uri]) == 0
    assert capsys.readouterr().out.strip() == store.uri_of("reports/store.html")
    assert main(["report", "--store", store.uri, "nope"]) == 2
    assert "runs ['nope']" in capsys.readouterr().err
    out = write_report(store, ["results", "demo"])
    assert out.endswith("reports/results+demo.html")


def test_percentile_ranks_put_any_score_on_one_scale():
    p = percentile_ranks(np.array([-1e9, 3.0, 3.0, 10.0]))
    assert p.tolist() == [12.5, 50.0, 50.0, 87.5]


def _args(store, method, **kw):
    return types.SimpleNamespace(policy=f"p-{method}", task=TARGET, store=store.uri, episodes=1, seeds=[0, 1],
                                 method=method, out="cli", proxy_source=None, proxy_episodes=None, envs_per_worker=1,
                                 no_ray=True, address=None, in_sample_proxy=False, func=None, **kw)


def test_evaluate_adds_a_methods_rows(store, monkeypatch, capsys):
    def fake(store, policy, task, episodes, seeds, method, *a, **k):
        time.sleep(0.2)  # the rollouts' time, which the manifest's wall time must include
        return [{"method": method, "task": task, "seed": s, "episodes": 1, "success": 1.0, "proxy_loss": 2.0,
                 "proxy_source": "x", "policy": policy, "selected_fraction": None, "level": None,
                 "evaluation": evaluate_cmd.ROLLOUTS} for s in seeds]

    monkeypatch.setattr(evaluate_cmd, "evaluate_policy", fake)
    evaluate_cmd.run(_args(store, "iwr"))
    evaluate_cmd.run(_args(store, "br"))
    evaluate_cmd.run(_args(store, "iwr"))  # a rerun replaces its own rows only
    rows = store.read_table(eval_key("cli")).to_pylist()
    assert sorted((r["method"], r["seed"]) for r in rows) == [("br", 0), ("br", 1), ("iwr", 0), ("iwr", 1)]
    manifest = store.manifest(eval_key("cli"))
    assert set(manifest.config["methods"]) == {"iwr", "br"} and manifest.wall_s >= 0.2


def test_proxy_is_held_out_unless_asked(store, caplog):
    with pytest.raises(FileNotFoundError, match="--proxy-source 'nope'"):
        evaluate_cmd.proxy_source_for(store, TARGET, "nope")
    with pytest.raises(ValueError, match="give one of them"):
        evaluate_cmd.proxy_source_for(store, TARGET, "prior", in_sample=True)
    with caplog.at_level(logging.WARNING):
        assert evaluate_cmd.proxy_source_for(store, TARGET) is None
    assert "no held-out target demos" in caplog.text
    store.write_table(steps_key("target-reach-heldout"), pa.table({"x": [1]}), "ingest-heldout", {})
    assert evaluate_cmd.proxy_source_for(store, TARGET) == "target-reach-heldout"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert evaluate_cmd.proxy_source_for(store, TARGET, in_sample=True) == "target-reach"
    assert "IN-SAMPLE" in caplog.text
