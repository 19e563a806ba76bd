"""The evaluate stage: MetaWorld success rate and proxy loss of a trained policy (``distcur evaluate``).

    distcur evaluate POLICY --task TASK [--store URI] [--episodes 50] [--seeds 0 1 2] [--method NAME]

``POLICY`` is a run name (``policies/<run>/policy.pt`` in ``--store``) or an explicit ``.pt`` key.
Rows go to the table ``evals/<out>/`` (default ``<out>`` = POLICY), one per seed: method, task,
seed, episodes, success (rate), proxy_loss, proxy_kind, proxy_source, policy, and, when
``--method`` names a committed selection, its selected_fraction and level. Evaluating another
method into the same ``--out`` adds its rows; rerunning a (method, task, seed) replaces that row
only. Name the method after the selection the policy was trained on (``--method iwr`` for
``selections/iwr``) and ``distcur report`` puts its success next to that selection's make-up.

The proxy (:mod:`distcur.policy.proxy`; ``--proxy nll``, the BC loss, by default, or ``mse``; its
kind is in every row) is scored on held-out target demos: ``steps/source=target-<task>-heldout``,
which ``distcur ingest metaworld`` writes (``--heldout-demos``). ``--proxy-source`` names another
source of demos not trained on; ``--in-sample-proxy`` scores the training target demos instead
(recorded as such, and said so). ``--episodes 0`` computes only the proxy (success is NaN). A task
with no simulator (not a MetaWorld v3 task, e.g. an OXE robot's) is evaluated by the proxy only as
well: the stage prints a ``PROXY-ONLY`` line, and its rows say ``evaluation: proxy-only`` (the
report repeats it). What the proxy measures and why it is held out: docs/benchmarks.md.

:func:`train_and_evaluate` trains a policy on a selection and evaluates it in one call (the
demo's policy jobs).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from distcur.config import to_dict
from distcur.data import (
    StepArrays,
    eval_key,
    heldout_source,
    load_steps,
    selection_key,
    steps_key,
    target_source,
)
from distcur.policy import checkpoint as ckpt
from distcur.policy.loaded import TrainedPolicy
from distcur.policy.proxy import PROXIES, check_proxy, policy_proxy
from distcur.policy.train import TrainConfig, train_policy
from distcur.stages.output import commit_output
from distcur.stages.train import load_policy, load_training_data, read_selection
from distcur.store import Store

log = logging.getLogger(__name__)

STAGE = "evaluate"
EVAL_COLUMNS = ("method", "task", "seed", "episodes", "success", "proxy_loss", "proxy_kind", "proxy_source", "policy",
                "selected_fraction", "level", "evaluation")
PROXY_ONLY, ROLLOUTS = "proxy-only", "rollouts"


def simulator_for(task: str) -> str | None:
    """The simulator that can roll out ``task`` ("metaworld"), or None when there is none here."""
    try:
        import metaworld
    except ImportError:
        return None
    return "metaworld" if task in metaworld.MT1.ENV_NAMES else None


def proxy_only_reason(task: str, episodes: int) -> str | None:
    """Why an evaluation of ``task`` measures no success (None when it rolls out ``episodes``)."""
    # a mistyped MetaWorld name (...-v3) still goes to the rollouts, which name the valid tasks
    if simulator_for(task) is None and not re.fullmatch(r"[a-z0-9-]+-v[23]", task):
        return f"no simulator for task {task!r} (not a MetaWorld v3 task, or metaworld is not installed)"
    return "--episodes 0" if episodes == 0 else None


def proxy_source_for(store, task: str, proxy_source: str | None = None, in_sample: bool = False) -> str | None:
    """The step source the proxy is scored on: ``proxy_source``, else the task's held-out demos
    (None, with a warning, when there are none), else with ``in_sample`` the training target demos."""
    if proxy_source is not None and in_sample:
        raise ValueError(f"--proxy-source {proxy_source!r} and --in-sample-proxy: give one of them")
    if proxy_source is not None:
        if store.manifest(steps_key(proxy_source)) is None:
            raise FileNotFoundError(f"--proxy-source {proxy_source!r}: no step table at "
                                    f"{store.uri_of(steps_key(proxy_source))}")
        return proxy_source
    if in_sample:
        log.warning("proxy loss is IN-SAMPLE: scored on %s, the target demos the policy was trained on",
                    target_source(task))
        return target_source(task)
    source = heldout_source(task)
    if store.manifest(steps_key(source)) is None:
        log.warning("no held-out target demos at %s: proxy loss recorded as NaN (write them with `distcur ingest "
                    "metaworld --heldout-demos N`, or pass --proxy-source / --in-sample-proxy)",
                    store.uri_of(steps_key(source)))
        return None
    return source


def load_heldout(store: Store, source: str, episodes: list[int] | None = None) -> StepArrays:
    """Steps of ``source`` (optionally only ``episodes``) to compute the proxy on."""
    if store.manifest(steps_key(source)) is None:
        raise FileNotFoundError(f"no committed step table at {store.uri_of(steps_key(source))} for the proxy")
    steps = load_steps(store, [source])
    if episodes is not None:
        keep = np.isin(steps.episode, np.asarray(episodes, np.int64))
        if not keep.any():
            raise ValueError(f"none of episodes {episodes[:10]} is in {store.uri_of(steps_key(source))}")
        steps = steps.take(np.flatnonzero(keep))
    return steps


def proxy_loss_on_source(policy: TrainedPolicy, store: Store, source: str, episodes: list[int] | None = None,
                         kind: str = "nll") -> float:
    """The ``kind`` proxy (:mod:`distcur.policy.proxy`) of ``policy`` on the steps of ``source``."""
    steps = load_heldout(store, source, episodes)
    return policy_proxy(policy, steps.state, steps.action, kind)


@dataclass
class EvaluateConfig:
    """How ``distcur evaluate`` measures one policy (YAML keys are these field names)."""

    episodes: int = field(default=50, metadata={"help": "rollouts per seed (0: proxy loss only)"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "evaluation seeds"})
    method: str | None = field(default=None, metadata={"help": "method label in the results (default: the policy name)"})
    out: str | None = field(default=None, metadata={"help": "eval run name: rows added to evals/<out>/ (default: POLICY)"})
    proxy: str = field(default="nll", metadata={
        "choices": PROXIES, "help": "proxy kind: nll (the BC loss, default) or mse (the executed action's error)"})
    proxy_source: str | None = field(default=None, metadata={
        "help": "step source for the proxy loss (default: target-<task>-heldout, see `ingest metaworld`)"})
    in_sample_proxy: bool = field(default=False, metadata={
        "help": "score the proxy on target-<task>, the demos the policy was trained on (optimistic)"})
    proxy_episodes: tuple[int, ...] | None = field(default=None, metadata={"help": "only these proxy episodes"})
    envs_per_worker: int = field(default=10, metadata={"help": "environments stepped together per Ray task"})
    ray: bool = field(default=True, metadata={"help": "run the rollouts as Ray tasks (--no-ray: in this process)"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: RAY_ADDRESS or a local Ray)"})

    def __post_init__(self):
        if self.episodes < 0:
            raise ValueError(f"--episodes must be >= 0, got {self.episodes}")
        if self.envs_per_worker < 1:
            raise ValueError(f"envs_per_worker must be >= 1, got {self.envs_per_worker}")
        if not self.seeds:
            raise ValueError("seeds must name at least one evaluation seed")
        check_proxy(self.proxy)
        self.seeds = tuple(int(s) for s in self.seeds)


def evaluate_policy(store: Store, policy_ref: str, task: str, episodes: int, seeds, method: str | None = None,
                    proxy_source: str | None = None, proxy_episodes=None, envs_per_worker: int = 10,
                    parallel: bool = True, address: str | None = None, in_sample_proxy: bool = False,
                    proxy_kind: str = "nll") -> list[dict]:
    """One record per seed (see the module docstring), without writing anything."""
    policy = load_policy(store, policy_ref)
    source = proxy_source_for(store, task, proxy_source, in_sample_proxy)
    episodes_list = list(proxy_episodes) if proxy_episodes is not None else None
    proxy = proxy_loss_on_source(policy, store, source, episodes_list, proxy_kind) if source else float("nan")
    reason = proxy_only_reason(task, episodes)
    if reason is not None:
        print(f"evaluate {policy_ref}: PROXY-ONLY evaluation, {reason}: success is not measured (NaN); the proxy "
              f"loss is the {_proxy_name(proxy_kind)} on {source or 'no demos (NaN)'}"
              f"{' (in-sample: the demos it trained on)' if in_sample_proxy else ''}", flush=True)
        episodes = 0
    executor = None
    if parallel and episodes > 0:  # one Ray task per batch of envs_per_worker environments
        from distcur import progress
        from distcur.distributed.tasks import RayTasks

        executor = RayTasks(address, progress=progress.enabled(), label=f"rollouts {task}")
    rates = _success(policy, task, episodes, seeds, envs_per_worker=envs_per_worker, executor=executor)
    method = method or policy_ref
    selection = store.manifest(selection_key(method))
    share = {"selected_fraction": selection.metadata.get("selected_fraction") if selection else None,
             "level": selection.config.get("level") if selection else None}
    return [{"method": method, "task": task, "seed": int(r["seed"]), "episodes": int(r["episodes"]),
             "success": float(r["success"]), "proxy_loss": float(proxy), "proxy_kind": proxy_kind,
             "proxy_source": source or "", "policy": policy_ref, **share,
             "evaluation": PROXY_ONLY if reason else ROLLOUTS} for r in rates]


def _proxy_name(kind: str) -> str:
    return {"nll": "BC loss (nll)", "mse": "executed action's squared error (mse)"}[kind]


def _success(policy: TrainedPolicy, task: str, episodes: int, seeds, **rollout) -> list[dict]:
    """Per seed {seed, episodes, success}: MetaWorld rollouts, or NaN success for ``episodes`` 0."""
    if episodes == 0:
        return [{"seed": int(s), "episodes": 0, "success": float("nan")} for s in seeds]
    from distcur.envs.rollouts import evaluate_success

    return evaluate_success(policy, task, episodes=episodes, seeds=seeds, **rollout)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the (method, task, seed) rows that ``new`` has, then ``new``."""
    replaced = {(r["method"], r["task"], int(r["seed"])) for r in new}
    return [r for r in old if (r["method"], r.get("task"), int(r["seed"])) not in replaced] + new


def run(store: Store | str, config: EvaluateConfig, policy: str, task: str) -> tuple[str, list[dict]]:
    """Evaluate ``policy`` on ``task`` and commit its rows into ``evals/<config.out or policy>``
    (evaluate never skips: it always reruns the rollouts and the proxy); returns (that key, the
    rows it added)."""
    store = store if isinstance(store, Store) else Store(store)
    key = eval_key(config.out or policy.replace("/", "_"))
    previous = store.manifest(key)
    # One config per method: the table holds every method evaluated into it.
    methods = {**(previous.config.get("methods", {}) if previous else {})}
    methods[config.method or policy] = {"policy": policy, "task": task, "store": store.uri, **to_dict(config)}
    added: list[dict] = []

    def produce(writer) -> dict:  # the writer's clock times the whole stage
        records = evaluate_policy(store, policy, task, config.episodes, config.seeds, config.method,
                                  config.proxy_source, config.proxy_episodes, config.envs_per_worker,
                                  parallel=config.ray, address=config.address, in_sample_proxy=config.in_sample_proxy,
                                  proxy_kind=config.proxy)
        old = store.read_table(key).to_pylist() if previous is not None else []
        rows = merge_rows(old, [{c: r[c] for c in EVAL_COLUMNS} for r in records])
        columns = list(dict.fromkeys([*EVAL_COLUMNS, *(c for r in rows for c in r)]))
        writer.write(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]))
        added.extend(records)
        log.info("evaluate: %d rows for %s (%d in all, %d methods) at %s", len(records), records[0]["method"],
                 len(rows), len({r["method"] for r in rows}), store.uri_of(key))
        return {"records": rows}

    commit_output(store, key, STAGE, {"methods": methods}, {}, produce, force=True)
    return key, added


def train_and_evaluate(store: Store | str, target_task: str, selection_run: str | None, train: TrainConfig,
                       method: str, episodes: int, max_steps: int | None = None, proxy_kind: str = "nll",
                       proxy_source: str | None = None,
                       on_checkpoint: Callable[[int, float], None] | None = None,
                       also_proxies: tuple[str, ...] = ()) -> dict:
    """Train a policy on ``target-<target_task>`` plus ``selections/<selection_run>`` (None:
    target-only) in this process, without writing it, then evaluate it: ``episodes`` MetaWorld
    rollouts with ``train.seed`` (0: none, success NaN) and the ``proxy_kind`` proxy on
    ``proxy_source`` (default the task's held-out demos). ``on_checkpoint(step, proxy)`` is called
    with the proxy of every checkpoint (each ``train.checkpoint_every`` steps: a sweep's reports).
    One result row: method, task, seed, episodes, success, proxy_loss, proxy_kind, selected_steps,
    train_s, eval_s, final_train_loss, and ``proxy_<kind>`` for each of ``also_proxies``."""
    store = store if isinstance(store, Store) else Store(store)
    selection = read_selection(store, selection_run) if selection_run else None
    data = load_training_data(store, target_source(target_task), selection)
    heldout = load_heldout(store, proxy_source or heldout_source(target_task))
    spec = data.policy_spec(train.hidden)

    def report(state: dict) -> None:
        p, _, norm = ckpt.unpack(state)
        on_checkpoint(int(state["step"]), policy_proxy(TrainedPolicy(p, spec, norm), heldout.state, heldout.action,
                                                       proxy_kind))

    t0 = time.time()
    params, normalizer, history = train_policy(data, train, checkpoint_fn=report if on_checkpoint else None)
    train_s = time.time() - t0
    policy = TrainedPolicy(params, spec, normalizer)
    t0 = time.time()
    rollout = {"max_steps": max_steps} if max_steps is not None else {}
    success = _success(policy, target_task, episodes, (train.seed,), envs_per_worker=max(episodes, 1),
                       **rollout)[0]
    proxy = policy_proxy(policy, heldout.state, heldout.action, proxy_kind)
    return {"method": method, "task": target_task, "seed": train.seed, "episodes": success["episodes"],
            "success": success["success"], "proxy_loss": proxy, "proxy_kind": proxy_kind,
            "selected_steps": int(data.n_prior), "train_s": round(train_s, 2), "eval_s": round(time.time() - t0, 2),
            "final_train_loss": history[-1]["loss"] if history else None,
            **{f"proxy_{k}": policy_proxy(policy, heldout.state, heldout.action, k) for k in also_proxies}}
