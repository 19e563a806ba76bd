"""The embedded default prior and target sets as a source: MetaWorld v3 generation jobs into
canonical step tables.

What is generated (the two kinds of prior, the failed modes, the seeds) is
:mod:`distcur.envs.generation`; this reader plans the episodes of a
:class:`~distcur.envs.generation.MetaWorldPriorConfig` (ids dense, in task order), groups them
into jobs of one task each (:func:`chunk_specs`), turns a job into a step table plus per-episode
statistics (:func:`generate_chunk`) and the jobs of one source into its table and manifest
metadata (:func:`source_table`). The stage (:func:`distcur.stages.ingest.run_metaworld`) commits
``steps/source=metaworld`` and ``steps/source=target-<task>``, running the jobs on the executor it
is handed (Ray tasks by default).

The target set is ``target_demos`` successful expert demos of the target task (source
``target-<task>``), never in the prior. The step table's manifest records each episode's kind
(``episode_modes``: ``success`` or the failed mode) and its initial-state seed
(``episode_seeds``: :func:`distcur.envs.metaworld.reset_env` replays it).

Rendered variant (``image_size > 0``): every kept episode is replayed from its initial-state
seed with its recorded actions (the replay is checked against the recorded states) and the
frame before each action is rendered by ``mujoco.Renderer`` from camera ``camera`` at
``image_size x image_size``, stored PNG (or JPEG) encoded in the step table's ``image`` column;
the camera is named in the manifest (``camera_names``, ``image_key``). Rendering sets
``MUJOCO_GL=osmesa`` first where no GL is chosen (:func:`distcur.envs.metaworld.use_headless_gl`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from distcur.data import target_source
from distcur.envs.generation import EpisodeSpec, MetaWorldPriorConfig, generate_episode
from distcur.envs.metaworld import Rollout, render_episode, use_headless_gl
from distcur.schema import source_metadata, steps_table, validate_steps
from distcur.sources.common import encode_image

PRIOR_SOURCE = "metaworld"
STAGE = "ingest-metaworld"


# -- the plan: which episodes, in which order, with which ids -------------------------------------


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


def generate_chunks(cfg: MetaWorldPriorConfig, chunks: Sequence[Sequence[EpisodeSpec]],
                    executor: Callable | None = None) -> list[tuple[pa.Table, list[dict]]]:
    """:func:`generate_chunk` over ``chunks``, in order: here one after another, or on
    ``executor(fn, items) -> [fn(item), ...]`` (e.g. Ray tasks) when given."""
    fn = functools.partial(generate_chunk, cfg)
    if executor is None:
        return [fn(c) for c in chunks]
    return list(executor(fn, [list(c) for c in chunks]))


def source_table(results: list[tuple[pa.Table, list[dict]]], extra_metadata: dict,
                 origin: str) -> tuple[pa.Table, dict]:
    """The step table of one source from its jobs' results, validated (errors name ``origin``), and
    its manifest metadata: per-source statistics, per-task counts, each episode's seed and mode."""
    table = validate_steps(pa.concat_tables([r[0] for r in results]), origin=origin)
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
    return table, metadata


def output_metadata(cfg: MetaWorldPriorConfig) -> dict[str, Any]:
    """What the manifests of the prior and target tables record about the generation besides the
    episodes: the target, the state dim, the one-hot task list, the camera."""
    extra: dict[str, Any] = {"target": cfg.target, "state_dim": cfg.state_dim}
    if cfg.append_task_onehot:
        extra["onehot_over"] = list(cfg.tasks)
    if cfg.image_size:
        extra.update(camera_names=[cfg.camera], image_key=cfg.camera, image_size=cfg.image_size,
                     image_format=cfg.image_format)
    return extra


def heldout_specs(cfg: MetaWorldPriorConfig, source: str, n: int) -> list[EpisodeSpec]:
    """``n`` fresh expert demos of the target, never trained on: their initial states come from
    episode indices after the training demos', so they differ from them."""
    return [EpisodeSpec(source, i, cfg.target, "target", cfg.target_demos + i) for i in range(n)]
