"""MetaWorld episode generation and environments: the config's rules, the expert's failure message,
and environments that behave like metaworld.MT1's."""

from __future__ import annotations

import numpy as np
import pytest

from distcur.envs.generation import EpisodeSpec, MetaWorldPriorConfig, generate_episode
from distcur.envs.metaworld import make_envs, reset_env


def test_target_is_added_to_tasks():
    cfg = MetaWorldPriorConfig(target="drawer-open-v3", tasks=("reach-v3",))
    assert cfg.tasks == ("reach-v3", "drawer-open-v3") and cfg.successes("drawer-open-v3") == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target="pick-place-wal-v3"), r"unknown MetaWorld target 'pick-place-wal-v3'; valid names: \[.*'pick-place-wall-v3'"),
        (dict(tasks=("reach-v3", "nope-v3")), r"unknown MetaWorld prior task 'nope-v3'; valid names"),
        (dict(target="peg-insert-side-v3"), r"expert fails.*valid names"),
        (dict(task_counts={"pick-place-wall-v3": 3}), "must be 0"),
        (dict(task_counts={"door-close-v3": 3}), "not in tasks"),
        (dict(success_noise=-0.1), "success_noise"),
        (dict(failed_modes=("wild",)), "failed_modes"),
        (dict(max_steps=501), "max_steps"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaWorldPriorConfig(**kwargs)


def test_expert_that_cannot_finish_within_max_steps_names_episode_task_and_both_remedies():
    cfg = MetaWorldPriorConfig(target="button-press-topdown-v3", tasks=("reach-v3", "drawer-close-v3"),
                               success_per_task=2, failed_per_task=3, target_demos=2, max_steps=3, failed_max_steps=3)
    spec = EpisodeSpec(source="metaworld", episode=4, task="reach-v3", role="success", index=0)
    with pytest.raises(ValueError, match=r"expert of task 'reach-v3' did not finish episode 4 of source 'metaworld' "
                                         r"within max_steps=3 in 8 attempts \(success_noise=0.1\); raise max_steps "
                                         r"\(at most 500\) or lower success_noise"):
        generate_episode(cfg, spec)


def test_envs_match_metaworld_mt1():
    """Our environments behave exactly like ones built by metaworld.MT1 from the same initial state."""
    import metaworld

    task = "pick-place-wall-v3"
    mt1 = metaworld.MT1(task, seed=3)
    theirs = mt1.train_classes[task]()
    theirs.set_task(mt1.train_tasks[5])
    ours = make_envs(task, 1)[0]
    np.testing.assert_array_equal(reset_env(theirs, 77), reset_env(ours, 77))
    assert np.any(reset_env(ours, 77)[36:] != 0)  # the goal is in the state
    rng = np.random.default_rng(0)
    for _ in range(20):
        act = rng.uniform(-1, 1, 4).astype(np.float32)
        a, b = theirs.step(act), ours.step(act)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1] and a[4]["success"] == b[4]["success"]
