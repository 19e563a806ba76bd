"""kill -9 of the CLI driver at a random moment of every stage, then a rerun: the store must equal
an undisturbed run's, table by table (tests/chaos.py).

The moment is drawn from ``DISTCUR_CHAOS_SEED`` (default: the clock) and printed in every failure,
so a failing draw can be replayed. Each stage runs as its own process with its own local Ray,
exactly as a user starts it; the kill takes the driver's whole process group (its Ray with it).
"""

from __future__ import annotations

import os
import random
import time

import chaos
import pytest

SEED = int(os.environ.get("DISTCUR_CHAOS_SEED", time.time_ns() % 100_000))


def test_every_stage_killed_at_a_random_moment_reruns_to_the_undisturbed_output(tmp_path):
    result = chaos.kill_trials(str(tmp_path), trials_per_stage=1, seed=SEED)
    assert [t["stage"] for t in result["trials"]] == list(chaos.STAGE_NAMES)
    for t in result["trials"]:
        assert t["killed"], f"seed {SEED}: {t['stage']} finished before its kill at {t['kill_at_s']} s ({result['walls']})"
        assert t["identical"], f"seed {SEED}: {t['stage']} killed at {t['kill_at_s']} s, then rerun: {t['differences']}"


@pytest.mark.slow
def test_demo_killed_at_a_random_moment_reruns_to_the_undisturbed_output(tmp_path):
    config_dir = chaos.write_configs(str(tmp_path / "configs"))
    reference, disturbed = str(tmp_path / "undisturbed"), str(tmp_path / "killed")
    run = chaos.run_stage(chaos.DEMO, reference, config_dir)
    assert run.returncode == 0, run.output
    at = random.Random(SEED).uniform(0.15, 0.85) * run.wall_s
    killed = chaos.run_stage(chaos.DEMO, disturbed, config_dir, kill_after=at)
    assert killed.killed, f"seed {SEED}: the demo finished before its kill at {at:.1f} s of {run.wall_s:.1f} s"
    rerun = chaos.run_stage(chaos.DEMO, disturbed, config_dir)
    assert rerun.returncode == 0, f"seed {SEED}: the rerun after a kill at {at:.1f} s failed:\n{rerun.output}"
    diff = chaos.differences(chaos.snapshot(reference), chaos.snapshot(disturbed))
    assert not diff, f"seed {SEED}: after the demo was killed at {at:.1f} s and rerun: {diff}"
