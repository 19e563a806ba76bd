"""The train stage: one policy co-trained on a target and a weighted prior selection, in the store.

``distcur train`` (:mod:`distcur.commands.train`) and the demo's policy jobs come here. What is
read and written:

* the target is one step source (``steps/source=target-<task>``); the prior selection is a table
  with :data:`~distcur.schema.SELECTION_SCHEMA` (``source, episode, step, weight``) joined against
  the prior's step tables (:func:`load_training_data`, which names bad rows);
* the policy goes to ``policies/<run>/policy.pt`` with a manifest (stage ``train``, config
  :func:`~distcur.policy.train.fingerprint_config`), training checkpoints to
  ``policies/<run>/checkpoints/`` (:func:`save_checkpoint`, :func:`latest_checkpoint`); a rerun
  resumes from the latest one, a finished identical run is skipped.

The maths (the loop, the checkpoint dicts) is :mod:`distcur.policy`; under Ray Train
(:func:`run` with a :class:`~distcur.distributed.train.DataParallel` executor) each worker runs
:func:`~distcur.policy.train.train_policy` on the rows ``rank::world`` of every batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from distcur.data import (
    action_space_of,
    is_target_source,
    list_sources,
    load_steps,
    policy_key,
    selection_key,
    source_metadata_of,
    steps_key,
    target_source,
)
from distcur.devices import ray_gpus
from distcur.distributed.train import DataParallel, WorkerContext
from distcur.policy import checkpoint as ckpt
from distcur.policy.actions import ActionStandardizer, choose_mode
from distcur.policy.loaded import TrainedPolicy
from distcur.policy.train import (
    TrainConfig,
    TrainingData,
    check_selection,
    final_state,
    fingerprint_config,
    rows_text,
    table_fingerprint,
    train_policy,
)
from distcur.schema import SELECTION_SCHEMA, list_column_to_numpy
from distcur.stages.output import commit_files
from distcur.store import Manifest, Store

log = logging.getLogger(__name__)

STAGE = "train"
BASELINES = ("target_only", "all", "random")


# -- policies and checkpoints in the store ------------------------------------------------------


def save_state(store: Store, key: str, state: dict) -> None:
    """Atomic write of one checkpoint object at ``key`` (relative to the store root)."""
    store.write_bytes(key, ckpt.to_bytes(state))


def load_state(store: Store, key: str) -> dict:
    try:
        data = store.read_bytes(key)
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"no policy checkpoint at {store.uri_of(key)}") from e
    return ckpt.from_bytes(data, store.uri_of(key))


def checkpoint_key(run: str, step: int) -> str:
    return f"{policy_key(run)}/{ckpt.CHECKPOINT_DIR}/step-{int(step):08d}.pt"


def save_checkpoint(store: Store, run: str, state: dict) -> str:
    """Write a training checkpoint, then point ``latest.json`` at it; returns its key."""
    key = checkpoint_key(run, state["step"])
    save_state(store, key, state)
    store.write_text(f"{policy_key(run)}/{ckpt.CHECKPOINT_DIR}/{ckpt.LATEST}",
                     json.dumps({"key": key, "step": state["step"]}))
    return key


def latest_checkpoint(store: Store, run: str) -> dict | None:
    """The latest training checkpoint of ``run``, or None when it has none."""
    pointer = f"{policy_key(run)}/{ckpt.CHECKPOINT_DIR}/{ckpt.LATEST}"
    if not store.exists(pointer):
        return None
    return load_state(store, json.loads(store.read_text(pointer))["key"])


def save_policy(store: Store, run: str, state: dict) -> str:
    """Write the final policy (optimiser state dropped); returns its key."""
    key = f"{policy_key(run)}/{ckpt.POLICY_FILE}"
    save_state(store, key, {k: v for k, v in state.items() if k != "adam"})
    return key


def load_policy_state(store: Store, run_or_key: str) -> dict:
    """A policy by run name (``policies/<run>/policy.pt``) or by an explicit ``.pt`` key."""
    key = run_or_key if run_or_key.endswith(".pt") else f"{policy_key(run_or_key)}/{ckpt.POLICY_FILE}"
    return load_state(store, key)


def load_policy(store: Store, run_or_key: str) -> TrainedPolicy:
    """``policies/<run>/policy.pt`` (or an explicit ``.pt`` key, e.g. a training checkpoint) as a policy."""
    return TrainedPolicy.from_state(load_policy_state(store, run_or_key))


# -- training data from the store ----------------------------------------------------------------


def read_selection(store: Store, run_or_key: str) -> pa.Table:
    """A committed selection by run name (``selections/<run>``) or by its store key."""
    key = run_or_key if run_or_key.startswith("selections/") else selection_key(run_or_key)
    if store.manifest(key) is None:
        raise FileNotFoundError(f"no committed selection at {store.uri_of(key)}")
    return store.read_table(key)


def _join_prior(prior: Store, selection: pa.Table) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(state (M, ds), action (M, da)) of each selection row, in selection order."""
    src = selection.column("source").to_numpy(zero_copy_only=False)
    ep = selection.column("episode").to_numpy()
    st = selection.column("step").to_numpy()
    states: np.ndarray | None = None
    actions: np.ndarray | None = None
    inputs: dict[str, str] = {}
    for source in pd.unique(src):
        rows = np.flatnonzero(src == source)
        key = steps_key(source)
        if prior.manifest(key) is None:
            raise ValueError(
                f"selection names source {source!r} ({rows.size} rows, e.g. {rows_text(src, ep, st, rows, 2)}) "
                f"but the prior store has no committed step table at {prior.uri_of(key)}"
            )
        inputs[f"prior:{source}"] = prior.input_fingerprint(key)
        episodes = np.unique(ep[rows]).tolist()
        table = prior.read_table(key, columns=["episode", "step", "state", "action"], filters=[("episode", "in", episodes)])
        found = pd.DataFrame({"episode": table.column("episode").to_numpy(), "step": table.column("step").to_numpy(),
                              "row": np.arange(table.num_rows)})
        wanted = pd.DataFrame({"episode": ep[rows], "step": st[rows]})
        joined = wanted.merge(found, on=["episode", "step"], how="left")
        if len(joined) != len(wanted):
            raise ValueError(f"prior step table {prior.uri_of(key)} has duplicate (episode, step) rows")
        unknown = np.flatnonzero(joined["row"].isna().to_numpy())
        if unknown.size:
            raise ValueError(
                f"selection has {unknown.size} rows with unknown (source, episode, step) ids, not in "
                f"{prior.uri_of(key)}: {rows_text(src, ep, st, rows[unknown])}"
            )
        take = joined["row"].to_numpy(np.int64)
        s = list_column_to_numpy(table.column("state"), f"{key}: state")[take]
        a = list_column_to_numpy(table.column("action"), f"{key}: action")[take]
        if states is None:
            states = np.zeros((len(selection), s.shape[1]), np.float32)
            actions = np.zeros((len(selection), a.shape[1]), np.float32)
        if s.shape[1] != states.shape[1] or a.shape[1] != actions.shape[1]:
            raise ValueError(
                f"{prior.uri_of(key)}: state/action dims {s.shape[1]}/{a.shape[1]} differ from the selection's "
                f"other sources ({states.shape[1]}/{actions.shape[1]})"
            )
        states[rows], actions[rows] = s, a
    assert states is not None and actions is not None
    return states, actions, inputs


def source_action_standardizer(store: Store, sources: list[str], output: str, mode: str = "auto",
                               prior_store: Store | None = None) -> ActionStandardizer | None:
    """The per-source action standardisation for training on ``sources`` together (None: none), acting in
    ``output``'s action space; ``mode`` is TrainConfig.action_normalization (:mod:`distcur.policy.actions`).
    Statistics come from each source's manifest (``output`` from ``store``, the rest from ``prior_store``,
    default ``store``)."""
    if len(sources) < 2 and mode != "per-source":
        return None
    stores = {s: store if s == output else (prior_store or store) for s in sources}
    try:
        metas = {s: source_metadata_of(stores[s], s) for s in sources}
    except ValueError:  # a step table committed without per-source metadata (not by an ingest)
        if mode == "per-source":
            raise
        log.warning("sources %s: no action statistics in a manifest; actions not standardised per source", sources)
        return None
    if choose_mode(mode, {s: action_space_of(m) for s, m in metas.items()}, metas) != "per-source":
        return None
    log.info("actions standardised per source (%s), the policy acting in %s's action space", ", ".join(sources),
             output)
    return ActionStandardizer.from_stats(metas, output=output)


def load_training_data(
    store: Store,
    target_source: str,
    selection: pa.Table | None,
    prior_store: Store | None = None,
    allow_empty_selection: bool = False,
    target_episodes: list[int] | None = None,
    action_normalization: str = "auto",
) -> TrainingData:
    """Target steps of ``target_source`` plus the prior steps a selection names, with weights.

    ``selection`` None means target-only. An empty selection, or one whose weights are all
    zero, is an error unless ``allow_empty_selection`` (then: target-only). The prior steps are
    read from ``prior_store`` (default: ``store``), only the selected episodes of each source.
    ``target_episodes`` keeps only those target episodes (to hold others out for the proxy).
    ``action_normalization`` (TrainConfig's): per-source standardisation of the actions, see
    :mod:`distcur.policy.actions`; the choice is logged and recorded in ``inputs``.
    """
    key = steps_key(target_source)
    if store.manifest(key) is None:
        raise FileNotFoundError(f"no committed target step table at {store.uri_of(key)}")
    target = load_steps(store, [target_source])
    if target_episodes is not None:
        keep = np.isin(target.episode, np.asarray(target_episodes, np.int64))
        missing = sorted(set(int(e) for e in target_episodes) - set(target.episode[keep].tolist()))
        if missing:
            raise ValueError(f"target episodes {missing[:10]} are not in {store.uri_of(key)}")
        target = target.take(np.flatnonzero(keep))
    inputs = {"target": store.input_fingerprint(key)}
    obs, act = target.state, target.action
    row_source = np.full(len(target), target_source, dtype=object)
    weights = np.zeros(0)
    if selection is not None:
        selection = check_selection(selection)
        w = selection.column("weight").to_numpy().astype(np.float64)
        if selection.num_rows == 0 or w.sum() <= 0:
            if not allow_empty_selection:
                what = "is empty" if selection.num_rows == 0 else f"has only zero weights ({selection.num_rows} rows)"
                raise ValueError(f"selection {what}; pass allow_empty_selection (CLI: --selection none) for target-only")
        else:
            p_obs, p_act, p_inputs = _join_prior(prior_store or store, selection)
            if p_obs.shape[1] != obs.shape[1] or p_act.shape[1] != act.shape[1]:
                raise ValueError(
                    f"prior state/action dims {p_obs.shape[1]}/{p_act.shape[1]} differ from the target's "
                    f"{obs.shape[1]}/{act.shape[1]} ({store.uri_of(key)})"
                )
            obs, act, weights = np.concatenate([obs, p_obs]), np.concatenate([act, p_act]), w
            row_source = np.concatenate([row_source, selection.column("source").to_numpy(zero_copy_only=False)])
            inputs.update(p_inputs)
        inputs["selection"] = table_fingerprint(selection)
    action_norm = None
    standardizer = source_action_standardizer(store, [str(s) for s in pd.unique(row_source)], target_source,
                                              action_normalization, prior_store)
    if standardizer is not None:
        act = standardizer.apply(act, row_source)
        action_norm = standardizer.to_dict()
        inputs["action_normalization"] = "per-source"
    return TrainingData(obs=obs, act=act, n_target=len(target), prior_weight=weights, inputs=inputs,
                        action_norm=action_norm)


def baseline_selection(
    store: Store, kind: str, fraction: float | None = None, seed: int = 0, sources: list[str] | None = None
) -> pa.Table:
    """The selection table of a baseline, through the same path as every method.

    ``"target_only"``: empty; ``"all"``: every prior step, weight 1; ``"random"``: a random
    ``fraction`` of the prior's episodes (all their steps, weight 1), drawn with ``seed``.
    ``sources`` defaults to every step source in ``store`` except the ``target-*`` ones.
    """
    if kind not in BASELINES:
        raise ValueError(f"baseline kind must be one of {BASELINES}, got {kind!r}")
    if kind == "target_only":
        return SELECTION_SCHEMA.empty_table()
    if kind == "random" and (fraction is None or not 0 < fraction <= 1):
        raise ValueError(f"random baseline needs a fraction in (0, 1], got {fraction}")
    sources = sources if sources is not None else [s for s in list_sources(store) if not is_target_source(s)]
    if not sources:
        raise FileNotFoundError(f"no prior step sources in {store.uri} for the {kind!r} baseline")
    parts = [store.read_table(steps_key(s), columns=["source", "episode", "step"]) for s in sources]
    table = pa.concat_tables(parts)
    if kind == "random":
        src = table.column("source").to_numpy(zero_copy_only=False).astype(str)
        ep = table.column("episode").to_numpy()
        keys = pd.MultiIndex.from_arrays([src, ep])
        uniq = keys.unique().sort_values()
        n = max(1, int(round(fraction * len(uniq))))
        chosen = uniq[np.sort(np.random.default_rng(seed).choice(len(uniq), n, replace=False))]
        table = table.filter(pa.array(keys.isin(chosen)))
    weight = pa.array(np.ones(table.num_rows, np.float32))
    return pa.table(
        {"source": table.column("source"), "episode": table.column("episode"), "step": table.column("step"),
         "weight": weight}
    ).cast(SELECTION_SCHEMA)


def write_policy(store: Store, run: str, state: dict, cfg: TrainConfig, inputs: dict[str, str], wall_s: float) -> Manifest:
    """Write ``policies/<run>/policy.pt`` and commit it with a manifest (stage "train")."""
    key = save_policy(store, run, state)
    rows = state["meta"]["data"]["n_target"] + state["meta"]["data"]["n_prior"]
    return commit_files(store, policy_key(run), STAGE, fingerprint_config(cfg), inputs, [key], rows,
                        {"history": state["meta"]["history"][-5:]}, wall_s)


def train_to_store(
    store: Store,
    run: str,
    data: TrainingData,
    cfg: TrainConfig,
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> Manifest:
    """Train in this process with checkpoints in ``policies/<run>/``; skip a finished identical run.

    With ``resume`` the run continues from its latest checkpoint (which must come from the same
    config); without, old checkpoints of ``run`` are deleted first.
    """
    config = fingerprint_config(cfg)
    if store.is_done(policy_key(run), STAGE, config, data.inputs):
        log.info("policy %s is up to date, skipping", store.uri_of(policy_key(run)))
        return store.manifest(policy_key(run))
    if not resume:
        store.delete_dir(f"{policy_key(run)}/{ckpt.CHECKPOINT_DIR}")
    state = latest_checkpoint(store, run) if resume else None
    if state is not None and state["meta"].get("data", {}).get("inputs") != data.inputs:
        raise ValueError(f"checkpoint of run {run!r} was trained on other inputs; use another run name or resume=False")
    t0 = time.time()
    params, normalizer, history = train_policy(
        data, cfg, resume_from=state, checkpoint_fn=lambda s: save_checkpoint(store, run, s), on_step=on_step
    )
    return write_policy(store, run, final_state(params, normalizer, cfg, data, history), cfg, data.inputs, time.time() - t0)


# -- the stage -----------------------------------------------------------------------------------


def resolve_target(store: Store, name: str) -> str:
    """A step source name for ``--target`` (the source itself, else ``target-<name>``)."""
    if store.manifest(steps_key(name)) is not None:
        return name
    if store.manifest(steps_key(target_source(name))) is not None:
        return target_source(name)
    raise FileNotFoundError(f"--target {name!r}: neither {store.uri_of(steps_key(name))} nor "
                            f"{store.uri_of(steps_key(target_source(name)))} is a committed step table")


def resolve_selection(prior_store: Store, spec: str | None) -> tuple[str | pa.Table | None, bool]:
    """(selection table or store key or None, allow_empty) for a selection spec: a selection run / key,
    ``none`` (target-only), ``all`` (every prior step, weight 1) or ``random:FRACTION[:SEED]``."""
    if spec is None or spec == "none":
        return None, True
    if spec == "all":
        return baseline_selection(prior_store, "all"), False
    if spec.startswith("random:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"--selection {spec!r}: expected random:FRACTION[:SEED]")
        seed = int(parts[2]) if len(parts) == 3 else 0
        return baseline_selection(prior_store, "random", fraction=float(parts[1]), seed=seed), False
    return spec, False


def _worker(payload: dict, ctx: WorkerContext) -> None:
    """One Ray Train worker: the data from the store, the loop on its rows, rank 0 writes the policy."""
    t0 = time.time()
    store = Store(payload["store"])
    selection = payload["selection"]
    if isinstance(selection, str):
        selection = read_selection(store, selection)
    cfg: TrainConfig = payload["cfg"]
    data = load_training_data(store, payload["target"], selection, Store(payload["prior_store"]),
                              allow_empty_selection=payload["allow_empty_selection"],
                              action_normalization=cfg.action_normalization)

    def report(state: dict) -> None:
        history = state["meta"]["history"]
        ctx.report({"step": state["step"], "loss": history[-1]["loss"] if history else float("nan")}, state)

    params, normalizer, history = train_policy(
        data, cfg, resume_from=ctx.resume, checkpoint_fn=report, on_step=payload["on_step"], rank=ctx.rank,
        world_size=ctx.world, all_reduce=ctx.all_reduce if ctx.world > 1 else None, device=ctx.device,
    )
    if ctx.rank == 0:
        write_policy(store, payload["run"], final_state(params, normalizer, cfg, data, history), cfg, data.inputs,
                     time.time() - t0)


def run(store: Store | str, config: TrainConfig, target: str, selection: str | pa.Table | None, run_name: str,
        prior_store: Store | str | None = None, allow_empty_selection: bool = False, resume: bool = True,
        executor: DataParallel | None = None, on_step: Callable[[int], None] | None = None) -> Manifest:
    """Train ``policies/<run_name>`` on ``target`` (a step source) plus ``selection`` (a selection key /
    run name, a table, or None: target-only) and return its manifest; a finished run with the same
    config and inputs is skipped (the store's ``force`` / ``verify_done`` apply).

    ``executor`` None trains in this process (checkpoints under ``policies/<run>/checkpoints``,
    resumed unless ``resume`` is False); a :class:`~distcur.distributed.train.DataParallel` one
    trains under Ray Train's ``TorchTrainer`` (its checkpoints under ``policies/<run>/ray`` or its
    ``storage_path``; workers hold a GPU each when ``config.device`` is ``cuda``, or ``auto`` on a
    cluster with GPUs). ``on_step(step)`` runs after each step (in every worker)."""
    store = store if isinstance(store, Store) else Store(store)
    prior = store if prior_store is None else prior_store if isinstance(prior_store, Store) else Store(prior_store)
    if selection is not None and not isinstance(selection, str | pa.Table):
        raise ValueError(f"selection must be a store key, a table or None, got {type(selection).__name__}")
    # The driver assembles the data once: it validates the inputs early and gives the skip check its inputs.
    table = read_selection(store, selection) if isinstance(selection, str) else selection
    data = load_training_data(store, target, table, prior, allow_empty_selection,
                              action_normalization=config.action_normalization)
    log.info("training %s: %d target + %d prior steps", run_name, data.n_target, data.n_prior)
    if executor is None:
        return train_to_store(store, run_name, data, config, resume=resume, on_step=on_step)
    if store.is_done(policy_key(run_name), STAGE, fingerprint_config(config), data.inputs):
        log.info("policy %s is up to date, skipping", store.uri_of(policy_key(run_name)))
        return store.manifest(policy_key(run_name))
    del data
    if not resume:
        store.delete_dir(f"{policy_key(run_name)}/ray")
    payload = {"store": store.uri, "prior_store": prior.uri, "target": target, "selection": selection,
               "allow_empty_selection": allow_empty_selection, "cfg": config, "run": run_name, "on_step": on_step}
    executor.fit(_worker, payload, executor.storage_path or store.uri_of(f"{policy_key(run_name)}/ray"),
                 use_gpu=lambda: ray_gpus(config.device, "TrainConfig.device") > 0,
                 resume_hint="start over with `distcur train --ray --fresh`")
    manifest = store.manifest(policy_key(run_name))
    if manifest is None:
        raise RuntimeError(f"Ray Train finished but wrote no policy at {store.uri_of(policy_key(run_name))}")
    return manifest
