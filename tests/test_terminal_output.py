"""What `distcur demo` shows at a terminal (issue #18): the policy jobs as one bar that keeps
moving while a job runs, one INFO line per job where no bar is drawn, and the benchmark's
pseudo-terminal measurement of lines and silences."""

from __future__ import annotations

import logging
import os
import sys
import time
import types

import pytest

from distcur import progress

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from bench_demo import screen_lines  # noqa: E402
from common import output_figures, run_in_pty  # noqa: E402


def _row(method: str, seed: int) -> dict:
    return {"method": method, "seed": seed, "success": 0.5, "proxy_loss": -1.25, "train_s": 40.0, "eval_s": 9.0}


@pytest.fixture
def slow_ray(monkeypatch):
    """A stand-in for ``ray`` whose jobs take ``delay_s`` each, one finishing per ``ray.wait``."""
    fake = types.SimpleNamespace(delay_s=1.0, waits=[])

    def wait(pending, num_returns=1, timeout=None):
        fake.waits.append(timeout)
        time.sleep(fake.delay_s)
        return list(pending[:num_returns]), list(pending[num_returns:])

    fake.wait = wait
    fake.get = lambda ref: _row(*ref)
    monkeypatch.setitem(sys.modules, "ray", fake)
    return fake


JOBS = [("br", "demo-br", 0), ("br", "demo-br", 1), ("iwr", "demo-iwr", 0)]


def test_job_bar_keeps_redrawing_while_a_job_runs(monkeypatch, capsys, caplog, slow_ray):
    from distcur.distributed.tasks import wait
    from distcur.stages.demo import describe_job

    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.setattr(progress, "REFRESH_S", 0.2)
    refs = [(m, s) for m, _, s in JOBS]
    committed = []
    with caplog.at_level(logging.INFO, logger="distcur.distributed.tasks"):
        rows = wait(refs, on_result=lambda i, row: committed.append(JOBS[i]), describe=describe_job, label="policies",
                    unit="job")
    assert [(r["method"], r["seed"]) for r in rows] == refs and committed == JOBS
    frames = capsys.readouterr().err.split("\r")
    # nothing finishes for 1 s: only the refresh timer draws the bar at 0/3 after its first frame
    assert sum(" 0/3 " in f for f in frames) >= 3, frames
    assert any(" 1/3 " in f and "br seed 0: success 0.50" in f for f in frames), frames
    assert any("iwr seed 0: success 0.50" in f for f in frames), frames
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]  # the bar shows them at the terminal


def test_without_a_terminal_every_job_is_one_log_line(monkeypatch, capsys, caplog, slow_ray):
    from distcur.distributed.tasks import wait
    from distcur.stages.demo import describe_job

    monkeypatch.delenv(progress.ENV, raising=False)  # pytest's stderr is not a terminal
    slow_ray.delay_s = 0.0
    with caplog.at_level(logging.INFO, logger="distcur.distributed.tasks"):
        wait([(m, s) for m, _, s in JOBS], describe=describe_job, label="policies", unit="job")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 3 and lines[0].startswith("[1/3] br ") and lines[2].startswith("[3/3] iwr ")
    assert "success 0.50, proxy nll -1.250 (train 40 s, eval 9 s)" in lines[0]
    assert capsys.readouterr().err == ""


def test_a_closed_bar_stops_redrawing(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    b = progress.bar(total=2, desc="short", refresh_s=0.05)
    time.sleep(0.3)
    b.close()
    before = capsys.readouterr().err
    time.sleep(0.3)
    assert before.count("\r") >= 4 and capsys.readouterr().err == ""


def test_output_figures_counts_newlines_and_the_longest_gap():
    chunks = [(0.5, b"start\r\n"), (1.0, b"\rbar 1/3"), (4.0, b"\rbar 2/3"), (4.5, b"\r        \rdone\r\n")]
    figures = output_figures(chunks, wall_s=6.0)
    assert figures["lines"] == 2
    assert figures["longest_silence_s"] == 3.0 and figures["silence_at_s"] == 1.0
    # the start before any output and the end after the last count as silences too
    assert output_figures([(12.0, b"x\n")], wall_s=13.0)["longest_silence_s"] == 12.0
    assert output_figures([(1.0, b"x\n")], wall_s=20.0)["silence_at_s"] == 1.0


def test_screen_lines_keep_what_a_terminal_shows():
    out = b"INFO a\r\n\rbar 1/2\rbar 2/2\r       \r\x1b[Atable row\r\n"
    assert screen_lines(out) == ["INFO a", "table row", ""]


def test_run_in_pty_sees_a_terminal_and_times_its_output():
    script = ("import os, sys, time; print(os.isatty(0), os.isatty(1), os.isatty(2), os.get_terminal_size(2).columns);"
              " sys.stderr.write('\\rbar 1'); sys.stderr.flush(); time.sleep(1.5);"
              " sys.stderr.write('\\rbar 2\\r     \\r'); print('done'); time.sleep(0.3)")
    run = run_in_pty([sys.executable, "-c", script], size=(24, 77))
    assert run["returncode"] == 0
    assert screen_lines(run["output"])[:2] == ["True True True 77", "done"]
    assert run["lines"] == 2
    assert 1.3 <= run["longest_silence_s"] < 3.0 and run["wall_s"] >= 1.8
    assert run["peak_rss_bytes"] > 0
