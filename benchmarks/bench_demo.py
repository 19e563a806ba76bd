"""`make demo` as users run it, on a terminal: what it prints, how long it stays silent, its wall
time and peak memory -> demo.json.

Runs ``distcur demo`` in a fresh process with a fresh store (so nothing is resumed) on a
pseudo-terminal (so progress bars and Ray behave as at a user's terminal), reads the terminal's
output as it arrives, samples the summed RSS of the whole process tree (driver, raylet, Ray
workers), and keeps the demo's comparison table. Goals (issues #7, #18) on 2 cores at the default
size: wall_s <= 600, lines (newlines the terminal received, the table included) <= 40,
longest_silence_s (longest stretch without output) <= 10.

    python benchmarks/bench_demo.py [--target TASK] [--record] [--note TEXT]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, run_in_pty, write_result  # noqa: E402

TARGET_LINES, TARGET_SILENCE_S, TARGET_WALL_S = 40, 10, 600
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def screen_lines(output: bytes) -> list[str]:
    """The lines a terminal shows for ``output``: each line as left after its last carriage return
    (a bar redrawn in place leaves its last state, or nothing once cleared), escapes removed."""
    text = output.decode("utf-8", "replace").replace("\r\n", "\n")
    return [_ANSI.sub("", ln.rsplit("\r", 1)[-1]).rstrip() for ln in text.split("\n")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default="pick-place-wall-v3")
    ap.add_argument("--record", action="store_true", help="also merge the table into quality_metaworld.json")
    ap.add_argument("--note", default=None, help="a remark stored with the figures (e.g. the machine was loaded)")
    args = ap.parse_args()
    store = tempfile.mkdtemp(prefix="bench-demo-")
    cmd = [sys.executable, "-m", "distcur.cli", "demo", "--store", store, "--target", args.target]
    if args.record:
        cmd += ["--record", os.path.join(RESULTS_DIR, "quality_metaworld.json")]
    env = {"TERM": os.environ.get("TERM") or "xterm-256color"}
    try:
        run = run_in_pty(cmd, env=env, timeout_s=3600)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    lines = screen_lines(run["output"])
    if run["returncode"] != 0:
        sys.exit(f"distcur demo failed ({run['returncode']}):\n" + "\n".join(lines[-60:]))
    start = next(i for i, ln in enumerate(lines) if ln.startswith("distcur demo: target"))
    table = [ln for ln in lines[start:] if ln.strip() and not ln.startswith(("wall", "recorded", "report"))]
    before_silence = [ln for ln in screen_lines(b"".join(c for t, c in run["chunks_at"] if t <= run["silence_at_s"]))
                      if ln.strip()]
    payload = {
        "wall_s": round(run["wall_s"], 1),
        "peak_rss_gb": round(run["peak_rss_bytes"] / 2**30, 3),
        "peak_single_process_rss_gb": round(run["peak_single_rss_bytes"] / 2**30, 3),
        "lines": run["lines"],
        "longest_silence_s": run["longest_silence_s"],
        "longest_silence_after": before_silence[-1] if before_silence else "",
        "longest_silence_at_s": run["silence_at_s"],
        "target_wall_s": TARGET_WALL_S,
        "target_lines": TARGET_LINES,
        "target_silence_s": TARGET_SILENCE_S,
        "measured_on": "a pseudo-terminal (stdin, stdout and stderr), 24 x 100",
        "command": " ".join(["distcur", *cmd[3:]]),
        "table": table,
        "screen": [ln for ln in lines if ln.strip()],
    }
    if args.note:
        payload["note"] = args.note
    path = write_result("demo", payload)
    print("\n".join(table))
    print(f"wall {run['wall_s']:.0f} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, {run['lines']} lines, "
          f"longest silence {run['longest_silence_s']:.1f} s -> {path}")


if __name__ == "__main__":
    main()
