"""Speed unchanged across a refactor: the executors' benchmarks under this checkout and under an
older commit, on the same machine in one session, in alternating order -> speed_equivalence.json.

What the refactor touched is timed: the datamodel batches on Ray tasks and on one TorchTrainer
(``bench_ray_train.py``, ``--models`` subset models), the meta-gradient iterations on the driver
and on Ray Train (``--iterations``), and the IWR stage on the KDE task grid and on Ray Data
(``bench_kde.py --parts ray-data``). Each benchmark runs in its own interpreter with the
checkout's code first on ``sys.path`` and writes to a temporary file; the older commit is checked
out into a temporary git worktree. Order: new, old, old, new, ... so that drifting load cancels.
The figure per wall is old / new (1.0: the same speed; the goal is agreement within noise).

    python benchmarks/speed_equivalence.py --old af8dbc1 [--rounds 1] [--models 256] [--iterations 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import worktree, write_result  # noqa: E402


def run_benchmarks(checkout: str, models: int, iterations: int, prior_steps: int, workdir: str) -> dict:
    """The walls of one checkout's benchmarks (its own scripts, its own code)."""
    env = {**os.environ, "PYTHONPATH": checkout}
    out: dict = {}
    ray_train = os.path.join(workdir, "datamodels.json")
    subprocess.run([sys.executable, os.path.join(checkout, "benchmarks", "bench_ray_train.py"), "--models", str(models),
                    "--iterations", str(iterations), "--out", ray_train], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(ray_train) as f:
        r = json.load(f)["ray_train_run"]
    out["datamodel_batches_ray_tasks_s"] = r["batches"]["ray_tasks_wall_s"]["median"]
    out["datamodel_batches_ray_train_s"] = r["batches"]["ray_train_wall_s"]["median"]
    out["metagrad_driver_s"] = r["metagrad"]["driver_wall_s"]["median"]
    out["metagrad_ray_train_s"] = r["metagrad"]["ray_train_wall_s"]["median"]
    kde = os.path.join(workdir, "kde.json")
    subprocess.run([sys.executable, os.path.join(checkout, "benchmarks", "bench_kde.py"), "--parts", "ray-data",
                    "--ray-data-prior", str(prior_steps), "--out", kde], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(kde) as f:
        k = json.load(f)["ray_data_kde"]
    out["iwr_task_grid_s"] = sum(k["wall_s"]["tasks"]) / len(k["wall_s"]["tasks"])
    out["iwr_ray_data_s"] = sum(k["wall_s"]["ray-data"]) / len(k["wall_s"]["ray-data"])
    out["iwr_scores_equal"] = bool(k["scores_equal"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="the commit before the refactor")
    ap.add_argument("--rounds", type=int, default=1, help="(new, old) pairs, alternating")
    ap.add_argument("--models", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=32)
    ap.add_argument("--prior-steps", type=int, default=200_000)
    ap.add_argument("--out-name", default="speed_equivalence")
    ap.add_argument("--first", choices=("new", "old"), default="new", help="which checkout runs first")
    ap.add_argument("--append", action="store_true",
                    help="add these runs to the existing result's (same commits and sizes), e.g. a second round "
                         "started with --first old")
    args = ap.parse_args()
    new_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    earlier_order: list[str] = []
    sizes = {"subset_models": args.models, "metagrad_iterations": args.iterations, "iwr_prior_steps": args.prior_steps}
    if args.append:
        with open(os.path.join(HERE, "results", f"{args.out_name}.json")) as f:
            earlier = json.load(f)
        if (earlier["old"], earlier["new"], earlier["sizes"]) != (args.old, new_commit, sizes):
            raise SystemExit(f"--append: the existing result is of {earlier['old']} vs {earlier['new']} at "
                             f"{earlier['sizes']}, not {args.old} vs {new_commit} at {sizes}")
        runs, earlier_order = earlier["runs"], earlier["order"]
    with tempfile.TemporaryDirectory() as tmp:
        with worktree(args.old, tmp) as old_tree:
            pair = ("new", "old") if args.first == "new" else ("old", "new")
            order = [w for i in range(args.rounds) for w in (pair if i % 2 == 0 else pair[::-1])]
            for i, which in enumerate(order):
                work = os.path.join(tmp, f"run-{i}")
                os.makedirs(work)
                runs[which].append(run_benchmarks(REPO if which == "new" else old_tree, args.models, args.iterations,
                                                  args.prior_steps, work))
                print(which, json.dumps(runs[which][-1]), flush=True)
    walls = [k for k in runs["new"][0] if k.endswith("_s")]
    mean = {w: {k: sum(r[k] for r in runs[w]) / len(runs[w]) for k in walls} for w in runs}
    ratios = {k: mean["old"][k] / mean["new"][k] for k in walls}
    path = write_result(args.out_name, {
        "what": "walls of the executors' benchmarks under the commit before the refactor (old) and this one (new), "
                "one machine, alternating; ratio = old / new (1.0: the same speed)",
        "old": args.old, "new": new_commit, "order": earlier_order + order, "sizes": sizes,
        "runs": runs, "old_over_new": ratios,
        "scores_equal_every_run": all(r["iwr_scores_equal"] for w in runs for r in runs[w]),
        "load_average_after": list(os.getloadavg()),
    })
    print(path)
    print(json.dumps(ratios, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
