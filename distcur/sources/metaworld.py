"""The embedded default prior and target sets: MetaWorld v3 scripted experts.

Two kinds of prior (``MetaWorldPriorConfig.kind``):

* ``hard`` (the default): per prior task ``success_per_task`` successful demos of the task's
  scripted expert with small Gaussian action noise, and ``failed_per_task`` failed or off-task
  rollouts. For the target task the prior holds *no* successful demo, only its failed attempts:
  data that looks like the target but teaches the wrong thing (where similarity is not utility).
* ``datamil``: modelled on the public DataMIL MetaWorld data (:meth:`MetaWorldPriorConfig.datamil`):
  every v3 task whose expert succeeds, demos with Gaussian action noise of 0.1 x the action range
  (std 0.2 on [-1, 1]) ending at their first success, failed attempts kept only once they reach
  ``failed_max_steps`` (200) steps without success (a failed attempt that succeeds earlier is
  redrawn), and the target task's own demos *in* the prior.

The target set is ``target_demos`` successful expert demos of the target task (source
``target-<task>``), never in the prior.

Every environment is built as ``metaworld.MT1`` builds its own (the goal is part of the 39-d
state; a test checks the two agree step for step). An episode's initial state (object and goal positions) is drawn by the environment's own sampler
from a seed derived from (config seed, role, task, episode index, attempt), so generation is a
pure function of the config: same seed, same tables.

Failed modes, cycled over a task's failed episodes:

* ``noisy``: the task's expert with heavy action noise (white, std ``failed_noise``, plus a
  constant per-episode offset of std ``failed_noise / 2`` that makes the arm drift);
* ``truncated``: the expert with small noise, cut at 30-70 % of the steps it needed to succeed;
* ``other_expert``: another prior task's expert driving this task's environment.

A failed rollout of the hard prior that happens to succeed is cut at 30-70 % of the steps before
its first success, so every failed episode is a failure by construction. The step table's manifest
records each episode's kind (``episode_modes``: ``success`` or the failed mode).

Rendered variant (``image_size > 0``): every kept episode is replayed from its initial-state
seed with its recorded actions (the replay is checked against the recorded states) and the
frame before each action is rendered by ``mujoco.Renderer`` from camera ``camera`` at
``image_size x image_size``, stored PNG (or JPEG) encoded in the step table's ``image`` column;
the camera is named in the manifest (``camera_names``, ``image_key``). Headless rendering needs a
GL: a rendering run sets ``MUJOCO_GL=osmesa`` when no display is set and none is chosen
(:func:`use_headless_gl`, before mujoco is imported; ``apt-get install libosmesa6``; about 0.1-0.2 s per frame on one CPU core whatever the size, so keep rendered sets
small) and may be ``egl`` on GPU nodes.

Only the per-episode maths lives here; the Ray fan-out over (task x chunk) is in
:mod:`distcur.distributed.metaworld`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from distcur.data import steps_key, target_source
from distcur.schema import source_metadata, steps_table, validate_steps
from distcur.store import Manifest, Store


def use_headless_gl() -> None:
    """``MUJOCO_GL=osmesa`` when no display is set and no backend was chosen, for a process about
    to render. Call it before mujoco is imported (its GL backend is fixed at import) and only where
    frames are rendered: with mujoco's OSMesa backend loaded, importing TensorFlow in the same
    process crashes (both bring their own LLVM), so distcur never sets it on import."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "osmesa")

PRIOR_SOURCE = "metaworld"
STAGE = "ingest-metaworld"
STATE_DIM = 39
ACTION_DIM = 4
MAX_PATH_LENGTH = 500  # MetaWorld v3's own episode limit
EXCLUDED_TASKS = {"peg-insert-side-v3": "its scripted expert fails"}
FAILED_MODES = ("noisy", "truncated", "other_expert")
MAX_ATTEMPTS = 8  # retries of a successful demo whose noisy expert run failed

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
PRIOR_KINDS = ("hard", "datamil")
# MetaWorld v3's cameras (every task's model has them)
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
IMAGE_FORMATS = ("png", "jpeg")
# DataMIL's data: noise 0.1 x the action range (2 on [-1, 1]); failures kept once they pass 200 steps.
DATAMIL_NOISE = 0.2
DATAMIL_FAILED_STEPS = 200


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


# -- configuration -------------------------------------------------------------------------------


@dataclass
class MetaWorldPriorConfig:
    """What ``distcur ingest metaworld`` generates.

    ``tasks`` are the prior tasks; the target is appended when missing (its failed attempts
    belong to the prior). ``task_counts`` overrides ``success_per_task`` for the named tasks
    (for the hard prior the target must stay at 0). ``append_task_onehot`` appends a one-hot of
    the task's index in ``tasks`` to every state (state dim 39 + len(tasks)). ``kind``: see the
    module docstring; :meth:`datamil` gives the DataMIL-like prior's settings.
    """

    target: str = "pick-place-wall-v3"
    kind: str = "hard"
    tasks: tuple[str, ...] = DEFAULT_TASKS
    success_per_task: int = 10
    failed_per_task: int = 10
    target_demos: int = 5
    success_noise: float = 0.1
    failed_noise: float = 1.0
    failed_modes: tuple[str, ...] = FAILED_MODES
    failed_max_steps: int = 150
    max_steps: int = MAX_PATH_LENGTH
    seed: int = 0
    task_counts: dict[str, int] | None = None
    append_task_onehot: bool = False
    chunk_episodes: int = 10
    image_size: int = 0  # > 0: render every step's frame (image_size x image_size) into the `image` column
    camera: str = "corner"
    image_format: str = "png"

    @classmethod
    def datamil(cls, target: str = "pick-place-wall-v3", per_task: int = 10, **overrides: Any) -> MetaWorldPriorConfig:
        """The DataMIL-like prior: every usable v3 task, ``per_task`` demos + ``per_task`` failures each
        (10 + 10: about 980 trajectories, 150k steps), the target's own demos included."""
        return cls(target=target, **{**datamil_options(per_task), **overrides})

    def __post_init__(self):
        if self.kind not in PRIOR_KINDS:
            raise ValueError(f"MetaWorldPriorConfig.kind must be one of {PRIOR_KINDS}, got {self.kind!r}")
        check_task(self.target, "target")
        tasks = tuple(self.tasks)
        if not tasks:
            raise ValueError("MetaWorldPriorConfig.tasks must name at least one task")
        for t in tasks:
            check_task(t, "prior task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"MetaWorldPriorConfig.tasks has duplicates: {tasks}")
        if self.target not in tasks:
            tasks = (*tasks, self.target)
        self.tasks = tasks
        for name in ("success_per_task", "failed_per_task", "chunk_episodes", "target_demos"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"MetaWorldPriorConfig.{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.image_size, int) or not 0 <= self.image_size <= 1024:
            raise ValueError(f"MetaWorldPriorConfig.image_size must be an int in [0, 1024] (0: no frames), got "
                             f"{self.image_size!r}")
        if self.camera not in CAMERAS:
            raise ValueError(f"MetaWorldPriorConfig.camera must be one of {CAMERAS}, got {self.camera!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"MetaWorldPriorConfig.image_format must be one of {IMAGE_FORMATS}, got "
                             f"{self.image_format!r}")
        if self.target_demos < 1 or self.chunk_episodes < 1:
            raise ValueError("MetaWorldPriorConfig: target_demos and chunk_episodes must be >= 1")
        for name in ("success_noise", "failed_noise"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"MetaWorldPriorConfig.{name} must be a finite std >= 0, got {value!r}")
        if not 1 <= self.max_steps <= MAX_PATH_LENGTH:
            raise ValueError(f"MetaWorldPriorConfig.max_steps must be in [1, {MAX_PATH_LENGTH}], got {self.max_steps}")
        if not 1 <= self.failed_max_steps <= self.max_steps:
            raise ValueError(
                f"MetaWorldPriorConfig.failed_max_steps must be in [1, max_steps={self.max_steps}], "
                f"got {self.failed_max_steps}"
            )
        self.failed_modes = tuple(self.failed_modes)
        bad = [m for m in self.failed_modes if m not in FAILED_MODES]
        if bad or not self.failed_modes:
            raise ValueError(f"MetaWorldPriorConfig.failed_modes {bad or '()'} invalid; choose from {FAILED_MODES}")
        if self.task_counts is not None:
            unknown = sorted(set(self.task_counts) - set(self.tasks))
            if unknown:
                raise ValueError(f"MetaWorldPriorConfig.task_counts names tasks not in tasks: {unknown}; tasks: {self.tasks}")
            for t, c in self.task_counts.items():
                if not isinstance(c, int) or c < 0:
                    raise ValueError(f"MetaWorldPriorConfig.task_counts[{t!r}] must be a non-negative int, got {c!r}")
            if self.kind == "hard" and self.task_counts.get(self.target, 0) != 0:
                raise ValueError(
                    f"MetaWorldPriorConfig.task_counts[{self.target!r}] must be 0: the prior holds no successful "
                    "demo of the target task"
                )
            self.task_counts = dict(sorted(self.task_counts.items()))

        if not sum(self.successes(t) + self.failed_per_task for t in self.tasks):
            raise ValueError("MetaWorldPriorConfig: the prior would be empty (no successful or failed episodes)")

    def successes(self, task: str) -> int:
        """Successful demos of ``task`` in the prior (0 for the target of the hard prior)."""
        if task == self.target and self.kind == "hard":
            return 0
        if self.task_counts is not None and task in self.task_counts:
            return self.task_counts[task]
        return self.success_per_task

    @property
    def state_dim(self) -> int:
        return STATE_DIM + (len(self.tasks) if self.append_task_onehot else 0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        d["failed_modes"] = list(self.failed_modes)
        if not self.image_size:  # a state-only config keeps the fingerprint it had before frames existed
            for k in IMAGE_FIELDS:
                d.pop(k)
        return d

    def target_config(self) -> dict:
        """The part of the config the target set depends on (it survives prior-only changes)."""
        d = {k: v for k, v in self.to_dict().items() if k in ("target", "target_demos", "success_noise", "max_steps", "seed")}
        if self.append_task_onehot:
            d["onehot_over"] = list(self.tasks)
        if self.image_size:
            d.update({k: getattr(self, k) for k in IMAGE_FIELDS})
        return d


IMAGE_FIELDS = ("image_size", "camera", "image_format")


def datamil_options(per_task: int = 10) -> dict[str, Any]:
    """The :class:`MetaWorldPriorConfig` options of the DataMIL-like prior (see the module docstring)."""
    return {"kind": "datamil", "tasks": tuple(valid_tasks()), "success_per_task": per_task,
            "failed_per_task": per_task, "success_noise": DATAMIL_NOISE, "failed_max_steps": DATAMIL_FAILED_STEPS,
            "failed_modes": ("noisy", "other_expert")}


# -- the plan: which episodes, in which order, with which ids -------------------------------------


@dataclass(frozen=True)
class EpisodeSpec:
    """One planned episode. ``role``: success | failed | target; ``index`` counts within (task, role)."""

    source: str
    episode: int
    task: str
    role: str
    index: int
    mode: str = "expert"


def plan_episodes(cfg: MetaWorldPriorConfig) -> tuple[list[EpisodeSpec], list[EpisodeSpec]]:
    """(prior, target) episode specs; episode ids are dense and follow task order."""
    prior: list[EpisodeSpec] = []
    for task in cfg.tasks:
        for i in range(cfg.successes(task)):
            prior.append(EpisodeSpec(PRIOR_SOURCE, len(prior), task, "success", i))
        for i in range(cfg.failed_per_task):
            mode = cfg.failed_modes[i % len(cfg.failed_modes)]
            prior.append(EpisodeSpec(PRIOR_SOURCE, len(prior), task, "failed", i, mode))
    src = target_source(cfg.target)
    target = [EpisodeSpec(src, i, cfg.target, "target", i) for i in range(cfg.target_demos)]
    return prior, target


def chunk_specs(specs: Sequence[EpisodeSpec], chunk_episodes: int) -> list[list[EpisodeSpec]]:
    """Group specs by task (one env per task per worker), then split into chunks."""
    by_task: dict[str, list[EpisodeSpec]] = {}
    for s in specs:
        by_task.setdefault(s.task, []).append(s)
    chunks = []
    for task_specs in by_task.values():
        for start in range(0, len(task_specs), chunk_episodes):
            chunks.append(task_specs[start : start + chunk_episodes])
    return chunks


def _cut_fraction(seed: int) -> float:
    return float(np.random.default_rng(derive_seed(seed, "cut")).uniform(0.3, 0.7))


def generate_episode(cfg: MetaWorldPriorConfig, spec: EpisodeSpec) -> tuple[Rollout, dict]:
    """Roll out one planned episode; returns it and stats (attempts, expert successes, cut, and
    ``seed``: the initial-state seed of the kept rollout, for :func:`reset_env` replays)."""
    stats = {"attempts": 0, "expert_successes": 0, "cut_after_success": 0, "seed": 0}
    if spec.role in ("success", "target"):
        stream = STREAM_SUCCESS if spec.role == "success" else STREAM_TARGET
        for attempt in range(MAX_ATTEMPTS):
            seed = derive_seed(cfg.seed, stream, spec.task, spec.index, attempt)
            ro = rollout_episode(spec.task, "expert", cfg.success_noise, seed, cfg.max_steps)
            stats["attempts"] += 1
            stats["seed"] = seed
            if ro.succeeded:
                stats["expert_successes"] += 1
                return ro.cut(ro.success_step + 1), stats
        raise ValueError(  # a config the expert cannot meet: the CLI's one-line error, not a traceback
            f"metaworld: the scripted expert of task {spec.task!r} did not finish episode {spec.episode} of source "
            f"{spec.source!r} within max_steps={cfg.max_steps} in {MAX_ATTEMPTS} attempts (success_noise="
            f"{cfg.success_noise}); raise max_steps (at most {MAX_PATH_LENGTH}) or lower success_noise"
        )
    if cfg.kind == "datamil":
        return _datamil_failure(cfg, spec, stats)
    seed = derive_seed(cfg.seed, STREAM_FAILED, spec.task, spec.index)
    stats["seed"] = seed
    if spec.mode == "truncated":
        ro = _failed_rollout(cfg, spec, seed, cfg.max_steps)
        if not ro.succeeded:
            ro = ro.cut(cfg.failed_max_steps)
    else:
        ro = _failed_rollout(cfg, spec, seed, cfg.failed_max_steps)
    if ro.succeeded:
        stats["cut_after_success"] = 1
        ro = ro.cut(max(1, int(ro.success_step * _cut_fraction(seed))))
    return ro, stats


def _failed_rollout(cfg: MetaWorldPriorConfig, spec: EpisodeSpec, seed: int, max_steps: int) -> Rollout:
    """One attempt of a failed mode: the noisy expert, or another prior task's expert."""
    if spec.mode == "noisy":
        return rollout_episode(spec.task, "expert", cfg.failed_noise, seed, max_steps, bias=cfg.failed_noise / 2)
    if spec.mode == "truncated":
        return rollout_episode(spec.task, "expert", cfg.success_noise, seed, max_steps)
    others = [t for t in cfg.tasks if t != spec.task] or [t for t in valid_tasks() if t != spec.task]
    driver = others[np.random.default_rng(derive_seed(seed, "driver")).integers(len(others))]
    return rollout_episode(spec.task, "expert", cfg.success_noise, seed, max_steps, policy_task=driver)


def _datamil_failure(cfg: MetaWorldPriorConfig, spec: EpisodeSpec, stats: dict) -> tuple[Rollout, dict]:
    """A failed attempt kept, as DataMIL's data keeps them, only once it ran ``failed_max_steps``
    steps without success; one that succeeds earlier is redrawn (cut as a last resort)."""
    ro = None
    for attempt in range(MAX_ATTEMPTS):
        seed = derive_seed(cfg.seed, STREAM_FAILED, spec.task, spec.index, attempt)
        ro = _failed_rollout(cfg, spec, seed, cfg.failed_max_steps)
        stats["attempts"] += 1
        stats["seed"] = seed
        if not ro.succeeded:
            return ro, stats
    stats["cut_after_success"] = 1
    return ro.cut(max(1, int(ro.success_step * _cut_fraction(stats["seed"])))), stats


def episode_columns(cfg: MetaWorldPriorConfig, spec: EpisodeSpec, ro: Rollout) -> dict[str, np.ndarray]:
    """Step-table columns of one episode."""
    n = len(ro)
    state = ro.state
    if cfg.append_task_onehot:
        onehot = np.zeros((n, len(cfg.tasks)), np.float32)
        onehot[:, cfg.tasks.index(spec.task)] = 1.0
        state = np.concatenate([state, onehot], axis=1)
    is_first = np.zeros(n, bool)
    is_first[0] = True
    is_last = np.zeros(n, bool)
    is_last[-1] = True
    return {
        "episode": np.full(n, spec.episode, np.int64),
        "step": np.arange(n, dtype=np.int32),
        "task": np.full(n, spec.task, object),
        "state": state,
        "action": ro.action,
        "reward": ro.reward,
        "is_first": is_first,
        "is_last": is_last,
        "is_terminal": np.zeros(n, bool),  # MetaWorld has no terminal states; success ends a demo early
        "success": np.full(n, ro.succeeded),
    }


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


def generate_chunk(cfg: MetaWorldPriorConfig, specs: Sequence[EpisodeSpec]) -> tuple[pa.Table, list[dict]]:
    """Generate planned episodes (all of one source) into a step table plus per-episode stats."""
    if cfg.image_size:
        use_headless_gl()
    parts, stats = [], []
    for spec in specs:
        cpu0 = time.process_time()
        ro, st = generate_episode(cfg, spec)
        st["cpu_s"] = time.process_time() - cpu0
        if spec.role == "failed" and ro.succeeded:
            raise AssertionError(f"failed episode {spec.episode} of {spec.task!r} succeeded")
        cols = episode_columns(cfg, spec, ro)
        if cfg.image_size:
            from distcur.sources.common import encode_image

            t0 = time.perf_counter()
            frames = render_episode(spec.task, st["seed"], ro, cfg.image_size, cfg.camera)
            cols["image"] = [encode_image(f, cfg.image_format) for f in frames]
            st["render_s"] = time.perf_counter() - t0
        parts.append(cols)
        stats.append({"episode": spec.episode, "task": spec.task, "role": spec.role, "mode": spec.mode,
                      "steps": len(ro), **st})
    cols = {k: [x for p in parts for x in p[k]] if k == "image" else np.concatenate([p[k] for p in parts])
            for k in parts[0]}
    cols["source"] = specs[0].source
    return steps_table(cols), stats


def summarize(stats: list[dict]) -> dict[str, dict]:
    """Per-task counts and the expert success rate (successful / attempted noisy expert demos)."""
    out: dict[str, dict] = {}
    for s in stats:
        t = out.setdefault(
            s["task"],
            {"success_episodes": 0, "failed_episodes": 0, "steps": 0, "failed_modes": {}, "cut_after_success": 0,
             "expert_attempts": 0, "expert_successes": 0, "cpu_s": 0.0},
        )
        t["steps"] += s["steps"]
        t["cpu_s"] += s.get("cpu_s", 0.0)
        if s["role"] == "failed":
            t["failed_episodes"] += 1
            t["failed_modes"][s["mode"]] = t["failed_modes"].get(s["mode"], 0) + 1
            t["cut_after_success"] += s["cut_after_success"]
        else:
            t["success_episodes"] += 1
            t["expert_attempts"] += s["attempts"]
            t["expert_successes"] += s["expert_successes"]
    for t in out.values():
        t["cpu_s"] = round(t["cpu_s"], 3)
        t["expert_success_rate"] = (
            round(t["expert_successes"] / t["expert_attempts"], 4) if t["expert_attempts"] else None
        )
    return out


# -- the stage -----------------------------------------------------------------------------------


def _output_info(key: str, manifest: Manifest, skipped: bool) -> dict:
    return {
        "key": key,
        "skipped": skipped,
        "rows": manifest.rows,
        "episodes": sum(s["episodes"] for s in manifest.metadata["sources"].values()),
        "tasks": manifest.metadata["tasks"],
    }


def _write_source(
    store: Store, key: str, config: dict, results: list[tuple[pa.Table, list[dict]]], extra_metadata: dict
) -> Manifest:
    table = validate_steps(pa.concat_tables([r[0] for r in results]), origin=store.uri_of(key))
    stats = sorted((s for r in results for s in r[1]), key=lambda s: s["episode"])
    metadata = {
        "sources": source_metadata(table),
        "tasks": summarize(stats),
        # initial-state seed of each episode (index = episode id): reset_env(env, seed) replays it
        "episode_seeds": [s["seed"] for s in stats],
        # what each episode is (index = episode id): "success" or its failed mode
        "episode_modes": [s["mode"] if s["role"] == "failed" else "success" for s in stats],
        # CPU seconds spent rolling out episodes, summed over workers (wall time on n idle cores ~ this / n)
        "cpu_s": round(sum(s["cpu_s"] for s in stats), 3),
        **({"render_s": round(sum(s["render_s"] for s in stats), 3)} if any("render_s" in s for s in stats) else {}),
        **extra_metadata,
    }
    return store.write_table(key, table, stage=STAGE, config=config, metadata=metadata)


def generate_metaworld(
    cfg: MetaWorldPriorConfig,
    store: Store,
    address: str | None = None,
    progress: bool = True,
    runner: Callable | None = None,
) -> dict:
    """Generate the prior (``steps/source=metaworld``) and target (``steps/source=target-<task>``).

    Each output is skipped when its committed manifest matches the config (resume). Work runs
    as Ray tasks over (task x chunk) unless ``runner`` (``runner(cfg, chunks) -> results``) is
    given, e.g. :func:`run_chunks_locally`. Returns ``{"prior": info, "target": info, "wall_s"}``
    where info is ``{"key", "skipped", "rows", "episodes", "tasks": per-task counts}``.
    """
    if cfg.image_size:  # before Ray starts, so that its workers render headless too
        use_headless_gl()
    t0 = time.time()
    outputs = {
        "prior": (steps_key(PRIOR_SOURCE), cfg.to_dict()),
        "target": (steps_key(target_source(cfg.target)), cfg.target_config()),
    }
    todo = {name: not store.is_done(key, STAGE, config, {}) for name, (key, config) in outputs.items()}
    prior_specs, target_specs = plan_episodes(cfg)
    chunks = {
        "prior": chunk_specs(prior_specs, cfg.chunk_episodes) if todo["prior"] else [],
        "target": chunk_specs(target_specs, cfg.chunk_episodes) if todo["target"] else [],
    }
    all_chunks = chunks["prior"] + chunks["target"]
    results: list = []
    if all_chunks:
        if runner is None:
            from distcur.distributed.metaworld import run_generation_chunks

            results = run_generation_chunks(cfg, all_chunks, address=address, progress=progress)
        else:
            results = runner(cfg, all_chunks)
    split = {"prior": results[: len(chunks["prior"])], "target": results[len(chunks["prior"]) :]}
    extra = {"target": cfg.target, "state_dim": cfg.state_dim}
    if cfg.append_task_onehot:
        extra["onehot_over"] = list(cfg.tasks)
    if cfg.image_size:
        extra.update(camera_names=[cfg.camera], image_key=cfg.camera, image_size=cfg.image_size,
                     image_format=cfg.image_format)
    out: dict[str, Any] = {}
    for name, (key, config) in outputs.items():
        if todo[name]:
            out[name] = _output_info(key, _write_source(store, key, config, split[name], extra), skipped=False)
        else:
            out[name] = _output_info(key, store.manifest(key), skipped=True)
    out["wall_s"] = round(time.time() - t0, 3)
    return out


def run_chunks_locally(cfg: MetaWorldPriorConfig, chunks: Sequence[Sequence[EpisodeSpec]]) -> list:
    """The same work in this process, without Ray (for debugging and speed comparisons)."""
    return [generate_chunk(cfg, c) for c in chunks]
