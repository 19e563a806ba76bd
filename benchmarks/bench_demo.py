"""`make demo` as users run it: wall time and peak memory of `distcur demo` -> demo.json.

Runs the demo in a fresh process with a fresh store (so nothing is resumed), samples the
summed RSS of its whole process tree (driver, raylet, Ray workers), and keeps the demo's
comparison table. Target (issue #7): wall_s <= 600 on 2 cores at the default size.

    python benchmarks/bench_demo.py [--target TASK] [--record]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, peak_rss_of_command, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default="pick-place-wall-v3")
    ap.add_argument("--record", action="store_true", help="also merge the table into quality_metaworld.json")
    args = ap.parse_args()
    store = tempfile.mkdtemp(prefix="bench-demo-")
    cmd = [sys.executable, "-m", "distcur.cli", "demo", "--store", store, "--target", args.target]
    if args.record:
        cmd += ["--record", os.path.join(RESULTS_DIR, "quality_metaworld.json")]
    out = os.path.join(store, "demo.out")
    # The demo's output goes to a file, not a pipe that nobody drains while it runs.
    shell = f"exec {shlex.join(cmd)} > {shlex.quote(out)} 2> {shlex.quote(out)}.err"
    try:
        run = peak_rss_of_command(["sh", "-c", shell], interval_s=0.2)
        with open(out) as f:
            lines = f.read().splitlines()
        if run["returncode"] != 0:
            with open(out + ".err") as f:
                sys.exit(f"distcur demo failed ({run['returncode']}):\n{f.read()[-4000:]}")
    finally:
        shutil.rmtree(store, ignore_errors=True)
    start = next(i for i, ln in enumerate(lines) if ln.startswith("distcur demo: target"))
    table = [ln for ln in lines[start:] if ln.strip() and not ln.startswith(("wall", "recorded", "report"))]
    path = write_result("demo", {
        "wall_s": round(run["wall_s"], 1),
        "peak_rss_gb": round(run["peak_rss_bytes"] / 2**30, 3),
        "peak_single_process_rss_gb": round(run["peak_single_rss_bytes"] / 2**30, 3),
        "target_wall_s": 600,
        "command": " ".join(["distcur", *cmd[3:]]),
        "table": table,
    })
    print("\n".join(table))
    print(f"wall {run['wall_s']:.0f} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB -> {path}")


if __name__ == "__main__":
    main()
