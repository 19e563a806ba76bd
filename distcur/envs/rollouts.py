"""MetaWorld rollouts -> success rate, with the policy run batched over a set of environments.

A policy is any picklable callable ``policy(obs) -> actions`` with ``obs`` (B, obs_dim) float32
and actions (B, 4) in [-1, 1]; one call steps B environments in lockstep. The scripted expert
goes through the same code as a trained policy, via :class:`ScriptedExpertPolicy`.

An episode succeeds when ``info['success']`` is ever 1 (that environment stops there) and fails
after ``max_steps``. Its initial state is a pure function of (task, seed, episode), drawn from
a seed stream that the prior and target generators never use, so evaluation never replays a
training demonstration. The batches of environments run here, one after another, unless the
caller hands in an ``executor`` (``executor(fn, items) -> [fn(item), ...]`` in order), e.g. Ray
tasks (:class:`distcur.distributed.tasks.RayTasks`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import numpy as np

from distcur.envs.metaworld import (
    ACTION_DIM,
    MAX_PATH_LENGTH,
    STATE_DIM,
    STREAM_EVAL,
    check_task,
    derive_seed,
    expert,
    make_envs,
    reset_env,
)

Policy = Callable[[np.ndarray], np.ndarray]
# executor(fn, items) -> [fn(item) for item in items], in order (sequential here by default)
Executor = Callable[[Callable, Sequence], list]


def check_eval_task(task: str) -> str:
    """Any MetaWorld v3 task can be evaluated (even one whose expert is excluded from the prior)."""
    return check_task(task, "task", allow_excluded=True)


def eval_episode_seed(task: str, seed: int, episode: int) -> int:
    """The initial-state seed of evaluation episode ``episode`` of ``seed`` on ``task``."""
    return derive_seed(STREAM_EVAL, task, int(seed), int(episode))


class ScriptedExpertPolicy:
    """MetaWorld's scripted expert of ``task`` as a batched policy (loops over the rows).

    Reads the first 39 dims of each observation, so a task one-hot appended to the state is
    ignored. ``noise`` adds Gaussian action noise (std) from a generator seeded with ``seed``.
    """

    def __init__(self, task: str, noise: float = 0.0, seed: int = 0):
        expert(task)  # fail early on a task without an expert
        self.task, self.noise, self.seed = task, float(noise), int(seed)
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        pol = expert(self.task)
        obs = np.asarray(obs, np.float64)
        act = np.stack([np.asarray(pol.get_action(o[:STATE_DIM]), np.float64) for o in obs])
        if self.noise > 0:
            act = act + self.noise * self._rng.standard_normal(act.shape)
        return np.clip(act, -1.0, 1.0).astype(np.float32)

    def __repr__(self) -> str:
        return f"ScriptedExpertPolicy({self.task!r}, noise={self.noise})"


class RandomPolicy:
    """Uniform random actions in [-1, 1] (a floor for the success rate)."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self._rng.uniform(-1.0, 1.0, (len(obs), ACTION_DIM)).astype(np.float32)


def task_onehot(task: str, over: Sequence[str]) -> np.ndarray:
    """(len(over),) float32 one-hot of ``task`` in ``over`` (the prior's task list)."""
    over = list(over)
    if task not in over:
        raise ValueError(f"task {task!r} is not in the one-hot task list {over}")
    v = np.zeros(len(over), np.float32)
    v[over.index(task)] = 1.0
    return v


def rollout_batch(
    policy: Policy,
    task: str,
    seed: int,
    episodes: Sequence[int],
    max_steps: int = MAX_PATH_LENGTH,
    append_task_onehot_over: Sequence[str] | None = None,
) -> dict:
    """Run ``episodes`` of ``(task, seed)`` in lockstep, one policy call per step for the active envs.

    Returns ``{"task", "seed", "episodes": [...], "success": [bool], "steps": [int],
    "env_steps": total, "policy_s", "env_s"}`` (``steps``: steps until success or ``max_steps``).
    """
    if not 1 <= max_steps <= MAX_PATH_LENGTH:
        raise ValueError(f"max_steps must be in [1, {MAX_PATH_LENGTH}], got {max_steps}")
    episodes = [int(e) for e in episodes]
    n = len(episodes)
    envs = make_envs(task, n)
    extra = task_onehot(task, append_task_onehot_over) if append_task_onehot_over is not None else None
    obs = np.stack([reset_env(env, eval_episode_seed(task, seed, e)) for env, e in zip(envs, episodes)])
    success = np.zeros(n, bool)
    steps = np.zeros(n, np.int64)
    active = np.ones(n, bool)
    policy_s = env_s = 0.0
    for _ in range(max_steps):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        x = obs[idx].astype(np.float32)
        if extra is not None:
            x = np.concatenate([x, np.broadcast_to(extra, (len(idx), len(extra)))], axis=1)
        t0 = time.perf_counter()
        act = np.asarray(policy(x), np.float32)
        policy_s += time.perf_counter() - t0
        if act.shape != (len(idx), ACTION_DIM) or not np.all(np.isfinite(act)):
            raise ValueError(
                f"policy {policy!r} returned actions of shape {act.shape} (finite: {bool(np.all(np.isfinite(act)))}) "
                f"for observations {x.shape}; expected ({len(idx)}, {ACTION_DIM}) finite values"
            )
        act = np.clip(act, -1.0, 1.0)
        t0 = time.perf_counter()
        for j, i in enumerate(idx):
            o, _, _, truncated, info = envs[i].step(act[j])
            obs[i] = o
            steps[i] += 1
            if info.get("success", 0):
                success[i] = True
                active[i] = False
            elif truncated:
                active[i] = False
        env_s += time.perf_counter() - t0
    return {
        "task": task,
        "seed": int(seed),
        "episodes": episodes,
        "success": success.tolist(),
        "steps": steps.tolist(),
        "env_steps": int(steps.sum()),
        "policy_s": round(policy_s, 4),
        "env_s": round(env_s, 4),
    }


def _jobs(episodes: int, seeds: Sequence[int], envs_per_worker: int) -> list[tuple[int, list[int]]]:
    return [
        (int(s), list(range(start, min(start + envs_per_worker, episodes))))
        for s in seeds
        for start in range(0, episodes, envs_per_worker)
    ]


def _rollout_job(job: tuple[int, Sequence[int]], policy: Policy, task: str, max_steps: int,
                 onehot: tuple[str, ...] | None) -> dict:
    seed, episodes = job
    return rollout_batch(policy, task, seed, episodes, max_steps, onehot)


def _run_jobs(policy, task, jobs, max_steps, onehot, executor: Executor | None) -> list[dict]:
    fn = functools.partial(_rollout_job, policy=policy, task=task, max_steps=max_steps, onehot=onehot)
    if executor is not None:
        return list(executor(fn, jobs))
    from distcur import progress

    return [fn(job) for job in progress.bar(jobs, desc=f"rollouts {task}", unit="batch")]


def evaluate_success(
    policy: Policy,
    task: str,
    episodes: int = 50,
    seeds: Sequence[int] = (0, 1, 2),
    envs_per_worker: int = 10,
    max_steps: int = MAX_PATH_LENGTH,
    append_task_onehot_over: Sequence[str] | None = None,
    executor: Executor | None = None,
) -> list[dict]:
    """Success rate of ``policy`` on ``task``: one record per seed.

    Returns ``[{"task", "seed", "episodes", "success": rate in [0, 1], "mean_steps"}, ...]``.
    ``append_task_onehot_over`` appends the task's one-hot over that task list to each
    observation (for a policy trained with ``append_task_onehot=True``). The batches of
    ``envs_per_worker`` environments run here unless ``executor`` is given.
    """
    check_eval_task(task)
    if episodes < 1 or envs_per_worker < 1 or not seeds:
        raise ValueError(f"evaluate_success: need episodes >= 1, envs_per_worker >= 1 and seeds, got "
                         f"{episodes}, {envs_per_worker}, {seeds}")
    onehot = tuple(append_task_onehot_over) if append_task_onehot_over is not None else None
    if onehot is not None:
        task_onehot(task, onehot)
    results = _run_jobs(policy, task, _jobs(episodes, seeds, envs_per_worker), max_steps, onehot, executor)
    out = []
    for s in seeds:
        mine = [r for r in results if r["seed"] == int(s)]
        succ = [x for r in mine for x in r["success"]]
        steps = [x for r in mine for x in r["steps"]]
        out.append({"task": task, "seed": int(s), "episodes": len(succ), "success": float(np.mean(succ)),
                    "mean_steps": float(np.mean(steps))})
    return out


def rollout_steps_per_s(
    policy: Policy,
    task: str,
    episodes: int = 20,
    envs_per_worker: int = 10,
    max_steps: int = 200,
    seed: int = 0,
    append_task_onehot_over: Sequence[str] | None = None,
    executor: Executor | None = None,
) -> dict:
    """Throughput of batched rollouts: environment steps per wall-clock second.

    Environment pools are warmed up first (one short untimed batch per worker) so the figure
    is steady-state stepping plus policy calls, not environment construction. Returns
    ``{"steps", "wall_s", "steps_per_s", "policy_s", "env_s", "success"}`` (policy_s and env_s
    summed over workers).
    """
    check_eval_task(task)
    onehot = tuple(append_task_onehot_over) if append_task_onehot_over is not None else None
    jobs = _jobs(episodes, (seed,), envs_per_worker)
    _run_jobs(policy, task, [(seed, eps) for _, eps in jobs], 1, onehot, executor)  # warm-up
    t0 = time.perf_counter()
    results = _run_jobs(policy, task, jobs, max_steps, onehot, executor)
    wall = time.perf_counter() - t0
    steps = sum(r["env_steps"] for r in results)
    return {
        "task": task,
        "episodes": episodes,
        "envs_per_worker": envs_per_worker,
        "steps": steps,
        "wall_s": round(wall, 4),
        "steps_per_s": round(steps / wall, 2),
        "policy_s": round(sum(r["policy_s"] for r in results), 4),
        "env_s": round(sum(r["env_s"] for r in results), 4),
        "success": float(np.mean([x for r in results for x in r["success"]])),
    }
