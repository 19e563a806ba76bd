"""Behaviour unchanged across a refactor: the demo at toy size under this checkout and under an older
commit, row by row -> demo_equivalence.json.

Every method runs (ingest, VAE, SR/AR/BR/STRAP/IWR/random, both DataMIL estimators, the oracle,
co-training, rollouts, the held-out proxy) on 2 seeds; each (method, seed) row's success, proxy loss
and selected steps must be identical, as every stage is seeded. The older commit is checked out
into a temporary git worktree and run with its own code (its demo config had flat training options).

    python benchmarks/demo_equivalence.py --old af8dbc1 [--out benchmarks/results/demo_equivalence.json]
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

# Run in a fresh interpreter with the code under test first on sys.path.
CHILD = r'''
import json, sys
store, out = sys.argv[1], sys.argv[2]
prior = {"tasks": ("reach-v3", "pick-place-v3"), "success_per_task": 2, "failed_per_task": 2,
         "failed_max_steps": 40, "max_steps": 150}
datamodel = {"hidden": (16, 16), "regression": {"num_models": 8, "heldout_models": 4, "steps": 20,
                                                "models_per_batch": 8},
             "metagrad": {"total_steps": 20, "meta_steps": 5, "iterations": 2}}
common = dict(store=store, seeds=(0, 1), vae={"train_steps": 50, "hidden": (32,)}, prior=prior, datamodel=datamodel)
try:
    from distcur.policy.train import TrainConfig
    from distcur.stages.demo import DemoConfig, DemoEvaluation, run_demo
    cfg = DemoConfig(**common, evaluation=DemoEvaluation(episodes=3, max_steps=60, heldout_demos=2),
                     train=TrainConfig(steps=40, hidden=(32, 32), checkpoint_every=0))
except ImportError:  # before the demo became a stage
    from distcur.pipeline import DemoConfig, run_demo
    cfg = DemoConfig(**common, episodes=3, max_steps=60, heldout_demos=2, train_steps=40, hidden=(32, 32))
rows = {f"{r['method']}/{r['seed']}": {"success": r["success"], "proxy_loss": r["proxy_loss"],
                                       "selected_steps": r["selected_steps"]}
        for r in run_demo(cfg).to_pylist()}
json.dump(rows, open(out, "w"))
'''


def run_demo_at(code_dir: str, work: str, name: str) -> dict:
    store, out = os.path.join(work, f"store-{name}"), os.path.join(work, f"{name}.json")
    env = {**os.environ, "PYTHONPATH": code_dir}
    subprocess.run([sys.executable, "-c", CHILD, store, out], cwd=code_dir, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="the commit to compare with")
    args = ap.parse_args()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    old = subprocess.run(["git", "rev-parse", args.old], cwd=REPO, capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="demo-equivalence-") as work:
        with worktree(old.strip(), work) as tree:
            before = run_demo_at(tree, work, "old")
        after = run_demo_at(REPO, work, "new")
    differ = {k: {"old": before.get(k), "new": after.get(k)} for k in sorted(set(before) | set(after))
              if before.get(k) != after.get(k)}
    payload = {"old_commit": old.strip(), "new_commit": head.strip(), "rows": len(after),
               "identical_rows": len(after) - len(differ), "differ": differ, "new": after,
               "what": "the demo at toy size (every method, 2 seeds x 3 rollouts), each (method, seed) row's "
                       "success, proxy loss and selected steps under both commits"}
    path = write_result("demo_equivalence", payload)
    print(f"{payload['identical_rows']} of {payload['rows']} rows identical -> {path}")
    return 0 if not differ else 1


if __name__ == "__main__":
    raise SystemExit(main())
