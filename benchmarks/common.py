"""Helpers every benchmark script shares: machine facts, repeated runs, peak memory, results files.

Benchmarks are run by hand (``python benchmarks/bench_<name>.py``) and write
``benchmarks/results/<name>.json``. Machines are shared and noisy, so each figure is the
median of >= 3 runs with min and max, and speed figures are ratios taken in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_facts() -> dict[str, Any]:
    """Cores, memory, load, library versions and BLAS of this machine, for a results file."""
    import numpy as np

    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "numpy": np.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            facts["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        facts["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except (TypeError, AttributeError):
        pass
    for module in ("torch", "pyarrow", "ray"):
        try:
            facts[module] = __import__(module).__version__
        except ImportError:
            pass
    if "torch" in facts:
        import torch

        facts["torch_threads"] = torch.get_num_threads()
        facts["torch_blas"] = "mkl" if torch.backends.mkl.is_available() else "other"
    return facts


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of repeated measurements (and the runs themselves)."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def repeat(fn: Callable[[], float], runs: int = 3) -> dict[str, Any]:
    """Call ``fn`` ``runs`` times (>= 3) and summarize what it returns."""
    if runs < 3:
        raise ValueError(f"a figure needs >= 3 runs, got {runs}")
    return summarize([fn() for _ in range(runs)])


def peak_rss_of_command(cmd: Sequence[str], interval_s: float = 0.05, env: dict | None = None,
                        timeout_s: float = 3600, stderr: Any = subprocess.DEVNULL) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process; peak summed RSS of it and all its descendants.

    Samples the process tree with psutil (so Ray's raylet and workers started by the command
    count); ``stderr`` is where its stderr goes (a file object, or DEVNULL). Returns
    ``{"peak_rss_bytes", "peak_single_rss_bytes", "wall_s", "returncode", "stdout"}``.
    """
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, **(env or {})})
    root = psutil.Process(proc.pid)
    peak_total = peak_single = 0
    while proc.poll() is None:
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            peak_single = max(peak_single, rss)
        peak_total = max(peak_total, total)
        if time.time() - t0 > timeout_s:
            proc.kill()
            raise TimeoutError(f"{cmd} ran past {timeout_s}s")
        time.sleep(interval_s)
    stdout = proc.communicate()[0]
    return {"peak_rss_bytes": peak_total, "peak_single_rss_bytes": peak_single,
            "wall_s": round(time.time() - t0, 3), "returncode": proc.returncode, "stdout": stdout}


def write_result(name: str, payload: dict[str, Any]) -> str:
    """Write ``benchmarks/results/<name>.json`` with machine facts added; returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    payload = {**payload, "machine": payload.get("machine") or machine_facts(),
               "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    return path
