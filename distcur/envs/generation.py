"""Episode generation for the MetaWorld prior and target sets: which expert, which noise, which
failure, from which seed.

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

An episode's initial state is drawn from a seed derived from (config seed, role, task, episode
index, attempt), so generation is a pure function of the config: same seed, same episodes.

Failed modes, cycled over a task's failed episodes:

* ``noisy``: the task's expert with heavy action noise (white, std ``failed_noise``, plus a
  constant per-episode offset of std ``failed_noise / 2`` that makes the arm drift);
* ``truncated``: the expert with small noise, cut at 30-70 % of the steps it needed to succeed;
* ``other_expert``: another prior task's expert driving this task's environment.

A failed rollout of the hard prior that happens to succeed is cut at 30-70 % of the steps before
its first success, so every failed episode is a failure by construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from distcur.envs.metaworld import (
    CAMERAS,
    DEFAULT_TASKS,
    MAX_PATH_LENGTH,
    STATE_DIM,
    STREAM_FAILED,
    STREAM_SUCCESS,
    STREAM_TARGET,
    Rollout,
    check_task,
    derive_seed,
    rollout_episode,
    valid_tasks,
)

FAILED_MODES = ("noisy", "truncated", "other_expert")
MAX_ATTEMPTS = 8  # retries of a successful demo whose noisy expert run failed
PRIOR_KINDS = ("hard", "datamil")
IMAGE_FORMATS = ("png", "jpeg")
# DataMIL's data: noise 0.1 x the action range (2 on [-1, 1]); failures kept once they pass 200 steps.
DATAMIL_NOISE = 0.2
DATAMIL_FAILED_STEPS = 200


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


# -- one episode ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodeSpec:
    """One planned episode. ``role``: success | failed | target; ``index`` counts within (task, role)."""

    source: str
    episode: int
    task: str
    role: str
    index: int
    mode: str = "expert"


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
