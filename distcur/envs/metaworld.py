"""MetaWorld v3 as arrays: MT1 task building, seeded initial states, the scripted experts and
their noise, single-episode rollouts, and frames rendered headless.

Every environment is built as ``metaworld.MT1`` builds its own (the goal is part of the 39-d
state; a test checks the two agree step for step). An episode's initial state (object and goal
positions) is drawn by the environment's own sampler from a seed (:func:`reset_env`), so a
rollout is a pure function of its arguments. Environments, experts and renderers are cached per
process (a Ray worker reuses them across tasks).

Headless rendering needs a GL: a rendering process sets ``MUJOCO_GL=osmesa`` when no display is
set and none is chosen (:func:`use_headless_gl`, before mujoco is imported; ``apt-get install
libosmesa6``; about 0.1-0.2 s per frame on one CPU core whatever the size) and may be ``egl`` on
GPU nodes.
"""

from __future__ import annotations

import functools
import os
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np


def use_headless_gl() -> None:
    """``MUJOCO_GL=osmesa`` when no display is set and no backend was chosen, for a process about
    to render. Call it before mujoco is imported (its GL backend is fixed at import) and only where
    frames are rendered: with mujoco's OSMesa backend loaded, importing TensorFlow in the same
    process crashes (both bring their own LLVM), so distcur never sets it on import."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "osmesa")


STATE_DIM = 39
ACTION_DIM = 4
MAX_PATH_LENGTH = 500  # MetaWorld v3's own episode limit
EXCLUDED_TASKS = {"peg-insert-side-v3": "its scripted expert fails"}

DEFAULT_TASKS = (
    "pick-place-wall-v3",
    "pick-place-v3",
    "reach-wall-v3",
    "push-wall-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-wall-v3",
    "button-press-v3",
    "button-press-topdown-v3",
    "reach-v3",
    "push-v3",
    "door-open-v3",
)

# Seed streams: initial states of different roles never share a seed.
STREAM_SUCCESS, STREAM_FAILED, STREAM_TARGET, STREAM_EVAL = 0, 1, 2, 3
# MetaWorld v3's cameras (every task's model has them)
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")


@functools.cache
def _valid_tasks() -> tuple[str, ...]:
    import metaworld
    from metaworld.policies import ENV_POLICY_MAP

    return tuple(sorted(n for n in metaworld.MT1.ENV_NAMES if n in ENV_POLICY_MAP and n not in EXCLUDED_TASKS))


def valid_tasks() -> list[str]:
    """MetaWorld v3 task names with a scripted expert that succeeds (prior and target candidates)."""
    return list(_valid_tasks())


def check_task(name: str, what: str = "task", allow_excluded: bool = False) -> str:
    """``name`` if it is a usable MetaWorld v3 task, else a ValueError listing the valid names."""
    if allow_excluded and name in EXCLUDED_TASKS:
        return name
    if name in EXCLUDED_TASKS:
        raise ValueError(f"{what} {name!r} cannot be used: {EXCLUDED_TASKS[name]}; valid names: {valid_tasks()}")
    names = valid_tasks()
    if name not in names:
        raise ValueError(f"unknown MetaWorld {what} {name!r}; valid names: {names}")
    return name


def derive_seed(*keys: int | str) -> int:
    """A 32-bit seed from ints and strings (strings hashed with crc32, stable across processes)."""
    ints = [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence([int(abs(i)) for i in ints]).generate_state(1)[0])


# -- environments (one cached instance per task per process) ------------------------------------
_TASK_OBJECTS: dict[str, Any] = {}
_ENV_POOLS: dict[str, list[Any]] = {}
_EXPERTS: dict[str, Any] = {}


def _mt1_task(task: str) -> tuple[type, Any]:
    """(env class, a task object) built exactly as ``metaworld.MT1(task)`` builds its tasks.

    MT1 also resets its environment 50 times to pre-draw 50 goals (about 1 s per task); the
    initial state here is drawn per episode by :func:`reset_env` instead, so only MT1's task
    arguments are used: the task's ML1 kwargs with ``partially_observable=False`` (the goal is
    part of the state).
    """
    if task not in _TASK_OBJECTS:
        import pickle

        from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML1_ARGS_KWARGS
        from metaworld.types import Task

        if task not in ALL_V3_ENVIRONMENTS:
            raise ValueError(f"unknown MetaWorld task {task!r}; valid names: {sorted(ALL_V3_ENVIRONMENTS)}")
        cls = ALL_V3_ENVIRONMENTS[task]
        kwargs = {k: v for k, v in ML1_ARGS_KWARGS[task]["kwargs"].items() if k != "task_id"}
        # rand_vec is a placeholder: reset_env always draws a fresh one from its seed.
        kwargs.update(rand_vec=None, env_cls=cls, partially_observable=False)
        _TASK_OBJECTS[task] = (cls, Task(env_name=task, data=pickle.dumps(kwargs)))
    return _TASK_OBJECTS[task]


def make_envs(task: str, n: int = 1) -> list[Any]:
    """``n`` environments of ``task`` from this process's pool (built once, then reused)."""
    pool = _ENV_POOLS.setdefault(task, [])
    while len(pool) < n:
        cls, mt_task = _mt1_task(task)
        env = cls()
        env.set_task(mt_task)
        env.max_path_length = MAX_PATH_LENGTH
        pool.append(env)
    return pool[:n]


def reset_env(env: Any, seed: int) -> np.ndarray:
    """Reset ``env`` to the initial state drawn from ``seed``; returns the (39,) observation.

    MT1 freezes one of 50 pre-drawn initial states per task object; instead, like MT1's own
    task generation, let the environment draw object and goal positions (with its rejection
    rules) from its seeded generator, so every (task, seed) has its own initial state.
    """
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env.seed(int(seed))
    obs, _ = env.reset()
    return np.asarray(obs, np.float64)


def expert(task: str) -> Any:
    """The scripted expert policy of ``task`` (``get_action(obs) -> (4,)``)."""
    if task not in _EXPERTS:
        from metaworld.policies import ENV_POLICY_MAP

        if task not in ENV_POLICY_MAP:
            raise ValueError(f"no scripted expert for {task!r}; valid names: {valid_tasks()}")
        _EXPERTS[task] = ENV_POLICY_MAP[task]()
    return _EXPERTS[task]


@dataclass
class Rollout:
    """One episode: ``state`` (T, 39) observations before each ``action`` (T, 4), ``reward`` (T,);
    ``success_step`` is the first step after whose action ``info['success']`` was 1 (-1: never)."""

    state: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    success_step: int

    @property
    def succeeded(self) -> bool:
        return self.success_step >= 0

    def __len__(self) -> int:
        return len(self.action)

    def cut(self, length: int) -> Rollout:
        """The first ``length`` steps; the success flag survives only if the success step is kept."""
        length = max(1, min(int(length), len(self)))
        keep_success = self.success_step if 0 <= self.success_step < length else -1
        return Rollout(self.state[:length], self.action[:length], self.reward[:length], keep_success)


def rollout_episode(
    task: str,
    policy_kind: str = "expert",
    noise: float = 0.0,
    seed: int = 0,
    max_steps: int = MAX_PATH_LENGTH,
    policy_task: str | None = None,
    stop_on_success: bool = True,
    bias: float = 0.0,
) -> Rollout:
    """Roll out one episode of ``task`` from the initial state of ``seed``.

    ``policy_kind``: ``"expert"`` (the scripted expert of ``policy_task``, default ``task``,
    plus Gaussian action noise of std ``noise`` and a constant per-episode offset of std
    ``bias``, clipped to [-1, 1]) or ``"random"`` (uniform actions). Deterministic in its
    arguments.
    """
    if policy_kind not in ("expert", "random"):
        raise ValueError(f"policy_kind must be 'expert' or 'random', got {policy_kind!r}")
    if not 1 <= max_steps <= MAX_PATH_LENGTH:
        raise ValueError(f"max_steps must be in [1, {MAX_PATH_LENGTH}], got {max_steps}")
    env = make_envs(task, 1)[0]
    rng = np.random.default_rng(derive_seed(seed, "actions"))
    pol = expert(policy_task or task) if policy_kind == "expert" else None
    offset = bias * rng.standard_normal(ACTION_DIM)
    obs = reset_env(env, seed)
    states, actions, rewards = [], [], []
    success_step = -1
    for t in range(max_steps):
        if pol is None:
            act = rng.uniform(-1.0, 1.0, ACTION_DIM)
        else:
            act = np.asarray(pol.get_action(obs), np.float64) + offset
            if noise > 0:
                act = act + noise * rng.standard_normal(ACTION_DIM)
        act = np.clip(act, -1.0, 1.0)
        states.append(obs)
        actions.append(act)
        obs, reward, _, truncated, info = env.step(act.astype(np.float32))
        rewards.append(float(reward))
        if info.get("success", 0) and success_step < 0:
            success_step = t
            if stop_on_success:
                break
        if truncated:
            break
    return Rollout(
        np.asarray(states, np.float32), np.asarray(actions, np.float32), np.asarray(rewards, np.float32), success_step
    )


def render_episode(task: str, seed: int, ro: Rollout, size: int, camera: str = "corner") -> np.ndarray:
    """Replay ``ro`` (from initial-state ``seed``, its recorded actions) and render the frame before
    each action: (T, size, size, 3) uint8. The replay must reproduce the recorded states."""
    env = make_envs(task, 1)[0]
    obs = reset_env(env, seed)
    renderer = _renderer(task, env, size)
    frames = np.empty((len(ro), size, size, 3), np.uint8)
    for t in range(len(ro)):
        if not np.allclose(obs, ro.state[t], atol=1e-4):
            raise AssertionError(f"metaworld: replaying {task!r} seed {seed} diverged from the recorded "
                                 f"episode at step {t} (max |diff| {np.abs(obs - ro.state[t]).max():.2e})")
        renderer.update_scene(env.data, camera=camera)
        frames[t] = renderer.render()
        obs, *_ = env.step(ro.action[t])
        obs = np.asarray(obs, np.float64)
    return frames


_RENDERERS: dict[tuple[str, int], Any] = {}


def _renderer(task: str, env: Any, size: int) -> Any:
    """This process's renderer of ``task``'s pooled env at ``size`` (a GL context costs ~1.5 s to make)."""
    import mujoco

    if (task, size) not in _RENDERERS:
        try:
            _RENDERERS[(task, size)] = mujoco.Renderer(env.model, size, size)
        except Exception as e:  # no GL context: mujoco raises several types here
            raise RuntimeError(f"metaworld: cannot render frames (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: "
                               f"{type(e).__name__}: {e}); headless rendering needs OSMesa (apt-get install "
                               "libosmesa6, MUJOCO_GL=osmesa) or EGL (MUJOCO_GL=egl)") from None
    return _RENDERERS[(task, size)]
