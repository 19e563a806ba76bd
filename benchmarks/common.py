"""Helpers every benchmark script shares: machine facts, repeated runs, peak memory, results files.

Benchmarks are run by hand (``python benchmarks/bench_<name>.py``) and write
``benchmarks/results/<name>.json``. Machines are shared and noisy, so each figure is the
median of >= 3 runs with min and max, and speed figures are ratios taken in the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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


class TreeRss:
    """Peak summed RSS of a process and all its descendants (Ray's raylet and workers included),
    sampled with psutil each time :meth:`sample` is called."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak_total = self.peak_single = 0

    def sample(self) -> bool:
        """One sample; False once the root process is gone."""
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return False
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            self.peak_single = max(self.peak_single, rss)
        self.peak_total = max(self.peak_total, total)
        return True


def peak_rss_of_command(cmd: Sequence[str], interval_s: float = 0.05, env: dict | None = None,
                        timeout_s: float = 3600, stderr: Any = subprocess.DEVNULL) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process; peak summed RSS of it and all its descendants.

    Samples the process tree with psutil (so Ray's raylet and workers started by the command
    count); ``stderr`` is where its stderr goes (a file object, or DEVNULL). Returns
    ``{"peak_rss_bytes", "peak_single_rss_bytes", "wall_s", "returncode", "stdout"}``.
    """
    t0 = time.time()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, **(env or {})})
    rss = TreeRss(proc.pid)
    while proc.poll() is None:
        if not rss.sample():
            break
        if time.time() - t0 > timeout_s:
            proc.kill()
            raise TimeoutError(f"{cmd} ran past {timeout_s}s")
        time.sleep(interval_s)
    stdout = proc.communicate()[0]
    return {"peak_rss_bytes": rss.peak_total, "peak_single_rss_bytes": rss.peak_single,
            "wall_s": round(time.time() - t0, 3), "returncode": proc.returncode, "stdout": stdout}


def output_figures(chunks: Sequence[tuple[float, bytes]], wall_s: float) -> dict[str, Any]:
    """What a terminal saw of a run, from its output ``chunks`` ((seconds since the start, bytes)
    in arrival order) and the run's ``wall_s``.

    ``lines``: newlines received (a progress bar redrawn in place with ``\\r`` adds none);
    ``longest_silence_s``: the longest stretch without output, counting the start to the first
    chunk and the last chunk to the exit (the user watches those too), with ``silence_at_s``
    where it began."""
    times = [0.0, *(t for t, _ in chunks), wall_s]
    gaps = [(b - a, a) for a, b in zip(times, times[1:])]
    longest, at = max(gaps)
    return {"lines": sum(c.count(b"\n") for _, c in chunks), "longest_silence_s": round(longest, 2),
            "silence_at_s": round(at, 2), "chunks": len(chunks), "output_bytes": sum(len(c) for _, c in chunks)}


def run_in_pty(cmd: Sequence[str], env: dict | None = None, timeout_s: float = 3600, rss_interval_s: float = 0.2,
               size: tuple[int, int] = (24, 100)) -> dict[str, Any]:
    """Run ``cmd`` with stdin, stdout and stderr on a pseudo-terminal of ``size`` (rows, columns),
    as a user's terminal runs it, reading the master side as output arrives.

    Returns :func:`output_figures`' fields plus ``{"output" (bytes), "chunks_at" ([(s, bytes)]),
    "wall_s", "returncode", "peak_rss_bytes", "peak_single_rss_bytes"}`` (RSS of the whole
    process tree, sampled every ``rss_interval_s``)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    t0 = time.time()
    try:
        proc = subprocess.Popen(list(cmd), stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                env={**os.environ, **(env or {})})
    finally:
        os.close(slave)
    rss = TreeRss(proc.pid)
    chunks: list[tuple[float, bytes]] = []
    next_sample = 0.0
    exited_at = None
    try:
        while True:
            now = time.time() - t0
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is None and now >= next_sample:
                rss.sample()
                next_sample = now + rss_interval_s
            if now > timeout_s:
                proc.kill()
                raise TimeoutError(f"{cmd} ran past {timeout_s}s")
            # after the exit, read what is left; a daemon the command left behind may hold the terminal open
            if exited_at is not None and now - exited_at > 2.0:
                break
            ready, _, _ = select.select([master], [], [], max(0.01, min(rss_interval_s, next_sample - now)))
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                data = b""
            if not data:
                break
            chunks.append((time.time() - t0, data))
        returncode = proc.wait()
        wall_s = exited_at if exited_at is not None else time.time() - t0
    finally:
        os.close(master)
    return {**output_figures(chunks, wall_s), "output": b"".join(c for _, c in chunks), "chunks_at": chunks,
            "wall_s": round(wall_s, 3), "returncode": returncode, "peak_rss_bytes": rss.peak_total,
            "peak_single_rss_bytes": rss.peak_single}


def update_result(name: str, updates: dict[str, Any]) -> str:
    """Read ``benchmarks/results/<name>.json``, replace the top-level keys in ``updates`` (every
    other key, another script's figures too, is kept), write it back atomically (a temporary
    file renamed over it) under an exclusive lock, so two scripts sharing the file lose
    nothing; returns its path."""
    import fcntl

    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                current = json.load(f)
        except FileNotFoundError:
            current = {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); fix or remove it before updating it") from e
        if not isinstance(current, dict):
            raise ValueError(f"{path}: expected a JSON object at top level, got {type(current).__name__}")
        current.update(updates)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(current, f, indent=2, default=float)
            f.write("\n")
        os.replace(tmp, path)
    return path


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


def init_local_ray(attempts: int = 3) -> None:
    """A private local Ray with every usable core; retried, since Ray's raylet start wait is a fixed
    30 s that a loaded machine can miss."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                     log_to_driver=False)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()


def run_ingest_child(make_cmd: Callable[[str], list[str]], workdir: str, prefix: str, attempts: int = 3) -> dict:
    """One ingest measurement in a fresh process: ``make_cmd(store_dir)`` (a fresh store folder under
    ``workdir``) must print ``{"steps", "wall_s"}`` as its last line. Retried when Ray fails to start.
    Returns steps, wall_s, steps_per_s and the process tree's peak RSS (summed, and largest process)."""
    import shutil
    import tempfile

    for attempt in range(attempts):
        store_dir = tempfile.mkdtemp(prefix=f"store-{prefix}-", dir=workdir)
        cmd = make_cmd(store_dir)
        with tempfile.TemporaryFile("w+") as err:
            out = peak_rss_of_command(cmd, env={"RAY_USAGE_STATS_ENABLED": "0"}, stderr=err)
            err.seek(0)
            log = err.read()
        shutil.rmtree(store_dir, ignore_errors=True)
        if out["returncode"] == 0:
            break
        if "timed out during startup" not in log or attempt == attempts - 1:
            raise RuntimeError(f"{cmd} failed with code {out['returncode']}:\n{log[-4000:]}")
        print(f"Ray failed to start (attempt {attempt + 1}); retrying", flush=True)
    timed = json.loads(out["stdout"].strip().splitlines()[-1])
    return {"steps": timed["steps"], "wall_s": timed["wall_s"], "steps_per_s": timed["steps"] / timed["wall_s"],
            "peak_rss_bytes": out["peak_rss_bytes"], "peak_single_rss_bytes": out["peak_single_rss_bytes"]}


@contextlib.contextmanager
def worktree(commit: str, parent: str) -> Iterator[str]:
    """``commit`` checked out (detached) in a temporary git worktree under ``parent``, removed after:
    the older code an equivalence benchmark runs beside this checkout's."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = os.path.join(parent, "old")
    subprocess.run(["git", "worktree", "add", "-q", "--detach", tree, commit], cwd=repo, check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=repo, check=False)
