"""MetaWorld rollout evaluation: the scripted expert through the batched path, a random floor, errors."""

from __future__ import annotations

import numpy as np
import pytest

from distcur.distributed.tasks import RayTasks
from distcur.envs.metaworld import STREAM_TARGET, derive_seed, make_envs, reset_env
from distcur.envs.rollouts import (
    RandomPolicy,
    ScriptedExpertPolicy,
    eval_episode_seed,
    evaluate_success,
    rollout_batch,
    rollout_steps_per_s,
)

TASK = "button-press-topdown-v3"


def test_scripted_expert_success_through_ray(ray_session):
    """The expert's known success (about 98 %) through the same batched code a trained policy uses."""
    res = evaluate_success(ScriptedExpertPolicy(TASK), TASK, episodes=10, seeds=(0,), envs_per_worker=5, max_steps=200,
                           executor=RayTasks(progress=False))
    assert [r["seed"] for r in res] == [0] and all(r["episodes"] == 10 and r["task"] == TASK for r in res)
    assert np.mean([r["success"] for r in res]) >= 0.9, res


def test_random_policy_fails(ray_session):
    res = evaluate_success(RandomPolicy(0), TASK, episodes=4, seeds=(0,), envs_per_worker=4, max_steps=100,
                           executor=RayTasks(progress=False))
    assert res[0]["success"] <= 0.25, res


def test_rollouts_are_deterministic_and_initial_states_distinct():
    a = rollout_batch(ScriptedExpertPolicy(TASK), TASK, seed=3, episodes=[0, 1, 2], max_steps=150)
    b = rollout_batch(ScriptedExpertPolicy(TASK), TASK, seed=3, episodes=[0, 1, 2], max_steps=150)
    assert a["success"] == b["success"] and a["steps"] == b["steps"]
    env = make_envs(TASK, 1)[0]
    starts = [reset_env(env, eval_episode_seed(TASK, s, e)) for s in (0, 1) for e in range(3)]
    target = reset_env(env, derive_seed(0, STREAM_TARGET, TASK, 0, 0))  # first target demo
    for i, x in enumerate(starts):
        assert not np.allclose(x, target)
        assert all(not np.allclose(x, y) for y in starts[i + 1:])


class OneHotCheck:
    """Checks the appended task one-hot, then acts like the expert."""

    def __init__(self):
        self.expert = ScriptedExpertPolicy(TASK)

    def __call__(self, obs):
        assert obs.shape[1] == 39 + 3
        np.testing.assert_array_equal(obs[:, 39:], np.tile([0, 1, 0], (len(obs), 1)))
        return self.expert(obs)


def test_task_onehot_is_appended():
    res = evaluate_success(OneHotCheck(), TASK, episodes=2, seeds=(0,), max_steps=150,
                           append_task_onehot_over=("reach-v3", TASK, "drawer-close-v3"))
    assert res[0]["success"] == 1.0


def test_steps_per_s():
    r = rollout_steps_per_s(RandomPolicy(0), TASK, episodes=3, envs_per_worker=3, max_steps=20)
    assert r["steps"] == 60 and r["steps_per_s"] > 0 and r["wall_s"] > 0


def test_errors():
    with pytest.raises(ValueError, match=r"unknown MetaWorld task 'pick-place-wal-v3'; valid names: \[.*'pick-place-wall-v3'"):
        evaluate_success(RandomPolicy(0), "pick-place-wal-v3", episodes=1)
    with pytest.raises(ValueError, match="valid names"):
        ScriptedExpertPolicy("nope-v3")
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        evaluate_success(lambda obs: np.zeros((len(obs), 3)), TASK, episodes=2, seeds=(0,))
    with pytest.raises(ValueError, match="not in the one-hot task list"):
        evaluate_success(RandomPolicy(0), TASK, episodes=1, append_task_onehot_over=("reach-v3",))
