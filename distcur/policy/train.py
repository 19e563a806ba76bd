"""Weighted co-training of one policy: config, data assembly, the training loop, baselines.

The loop is :func:`train_policy`. It runs :func:`~distcur.policy.functional.make_train_step` on
batches from :class:`~distcur.policy.sampler.MixtureSampler` (target with probability ``alpha``,
else the weighted prior selection); everything that decides the result is a function of the
config's seed, so a run is deterministic and a resumed run (params, Adam state, step) matches an
uninterrupted one exactly. The Ray Train path (``distcur.distributed.train``) calls the same loop
inside each worker.

Data: the target is one step source (``steps/source=target-<task>``); the prior selection is a
table with :data:`~distcur.schema.SELECTION_SCHEMA` (``source, episode, step, weight``) joined
against the prior's step tables. :func:`load_training_data` validates it and names bad rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from distcur.config import to_dict
from distcur.data import (
    action_space_of,
    is_target_source,
    list_sources,
    load_steps,
    policy_key,
    selection_key,
    source_metadata_of,
    steps_key,
)
from distcur.devices import check_device, resolve_device
from distcur.policy import checkpoint as ckpt
from distcur.policy.actions import MODES as ACTION_MODES
from distcur.policy.actions import ActionStandardizer, choose_mode
from distcur.policy.functional import (
    AdamConfig,
    Normalizer,
    Params,
    PolicySpec,
    adam_init,
    adam_update,
    init_params,
    make_train_step,
    policy_forward,
    tanh_gaussian_nll,
)
from distcur.policy.sampler import MIXINGS, WEIGHTINGS, MixtureSampler
from distcur.progress import bar
from distcur.schema import SELECTION_SCHEMA, list_column_to_numpy
from distcur.store import Manifest, Store

log = logging.getLogger(__name__)

STAGE = "train"
BASELINES = ("target_only", "all", "random")
# Config fields that may change between a checkpoint and its resumption (they do not alter the maths).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "device")


@dataclass
class TrainConfig:
    """Training settings of one policy (DataMIL's MetaWorld defaults).

    ``alpha``: probability that a batch element comes from the target (the rest from the
    prior selection; 1.0 or an empty selection = target-only). ``weighting``: how selection
    weights act, ``"sample"`` (draw prior rows proportional to weight, loss weight 1) or
    ``"loss"`` (draw uniformly, weight the loss), see :mod:`distcur.policy.sampler`.
    ``checkpoint_every``: steps between checkpoints (0: only at the end).
    ``action_bounds``: the raw action range mapped onto the tanh's (-1, 1) (MetaWorld: [-1, 1]);
    None fits it to the training data. ``device``: ``auto`` (CUDA when present), ``cpu`` or
    ``cuda`` (:mod:`distcur.devices`); under Ray Train, ``auto``/``cuda`` ask for a GPU per worker.
    The device is how a run computes, not what: it is left out of the run's fingerprint
    (:func:`fingerprint_config`), and a checkpoint resumes on another device.
    ``action_normalization``: ``per-source`` standardises each source's actions with its own mean/std
    from its manifest (:mod:`distcur.policy.actions`; the range is then fitted, ``action_bounds`` unused)
    and the policy acts in the target's space; ``global`` does not; ``auto`` (default) is per-source
    exactly when the target and the selected sources do not share one action space.
    """

    hidden: tuple[int, ...] = (400, 400, 400)
    lr: float = 1e-3
    batch_size: int = 256
    steps: int = 4000
    alpha: float = 0.5
    seed: int = 0
    weighting: str = "sample"
    mixing: str = "bernoulli"  # or "split": exactly round(alpha * B) target rows per batch
    weight_decay: float = 0.0
    checkpoint_every: int = 1000
    log_every: int = 100
    action_bounds: tuple[float, float] | None = (-1.0, 1.0)
    device: str = "auto"
    action_normalization: str = "auto"

    def __post_init__(self):
        check_device(self.device, "TrainConfig.device")
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(f"TrainConfig.hidden must be positive layer sizes, got {self.hidden}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        for name in ("batch_size", "steps", "log_every"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"TrainConfig.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"TrainConfig.alpha must be in [0, 1], got {self.alpha}")
        if self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be >= 0, got {self.seed}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"TrainConfig.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"TrainConfig.mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.action_normalization not in ACTION_MODES:
            raise ValueError(f"TrainConfig.action_normalization must be one of {ACTION_MODES}, "
                             f"got {self.action_normalization!r}")
        if self.action_bounds is not None:
            lo, hi = (float(x) for x in self.action_bounds)
            if not lo < hi:
                raise ValueError(f"TrainConfig.action_bounds must be (low, high) with low < high, got {self.action_bounds}")
            self.action_bounds = (lo, hi)


def fingerprint_config(cfg: TrainConfig) -> dict:
    """The JSON config a policy's manifest and checkpoints record: every field but ``device`` (how
    it computes, not what) and ``action_normalization`` at its default ``auto`` (what auto chose is
    in the training data's inputs: ``per-source`` when it standardised per source)."""
    return {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items()
            if k != "device" and not (k == "action_normalization" and v == "auto")}


# -- data ------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Raw training arrays: rows ``[0, n_target)`` are target steps, the rest the prior selection.

    ``obs`` (N, state_dim) float32, ``act`` (N, action_dim) float32 raw (unnormalised), or with
    ``action_norm`` (an :class:`~distcur.policy.actions.ActionStandardizer` as a dict) each row
    standardised by its source's statistics; ``prior_weight`` (N - n_target,) float64 selection
    weights, ``inputs`` fingerprints of what the arrays were built from (for the training manifest).
    """

    obs: np.ndarray
    act: np.ndarray
    n_target: int
    prior_weight: np.ndarray
    inputs: dict[str, str] = field(default_factory=dict)
    action_norm: dict | None = None

    @property
    def n_prior(self) -> int:
        return len(self.prior_weight)

    def policy_spec(self, hidden: tuple[int, ...]) -> PolicySpec:
        """The shape of a policy trained on these arrays, with ``hidden`` layer widths."""
        return PolicySpec(state_dim=self.obs.shape[1], action_dim=self.act.shape[1], hidden=tuple(hidden))

    def fit_normalizer(self, action_bounds: tuple[float, float] | None) -> Normalizer:
        """State/action statistics of the training data (target + every selected prior step); the
        action range is fitted when actions were standardised per source."""
        return Normalizer.fit(self.obs, self.act, None if self.action_norm else action_bounds)


def table_fingerprint(table: pa.Table) -> str:
    """Content hash of a (small) table, for tables that are not committed store inputs."""
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(name.encode())
        for chunk in table.column(name).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.hexdigest()[:16]


def _rows_text(src, ep, st, rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(f"(source={src[i]!r}, episode={int(ep[i])}, step={int(st[i])})" for i in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def check_selection(selection: pa.Table, origin: str = "selection") -> pa.Table:
    """Validate a selection table and return it cast to :data:`SELECTION_SCHEMA`.

    Rejects missing columns, nulls, NaN/inf or negative weights and duplicate
    (source, episode, step) rows; the error names the offending rows.
    """
    missing = [n for n in SELECTION_SCHEMA.names if n not in selection.column_names]
    if missing:
        raise ValueError(f"{origin}: missing columns {missing}; expected {SELECTION_SCHEMA.names}")
    for name in SELECTION_SCHEMA.names:
        if selection.column(name).null_count:
            raise ValueError(f"{origin}: column {name!r} has {selection.column(name).null_count} nulls")
    try:
        selection = selection.select(SELECTION_SCHEMA.names).cast(SELECTION_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"{origin}: does not cast to the selection schema {SELECTION_SCHEMA}: {e}") from e
    src = selection.column("source").to_numpy(zero_copy_only=False)
    ep = selection.column("episode").to_numpy()
    st = selection.column("step").to_numpy()
    w = selection.column("weight").to_numpy()
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise ValueError(f"{origin}: {bad.size} non-finite weights at {_rows_text(src, ep, st, bad)}")
    bad = np.flatnonzero(w < 0)
    if bad.size:
        raise ValueError(f"{origin}: {bad.size} negative weights (e.g. {w[bad[0]]}) at {_rows_text(src, ep, st, bad)}")
    dup = np.flatnonzero(pd.DataFrame({"s": src, "e": ep, "t": st}).duplicated().to_numpy())
    if dup.size:
        raise ValueError(f"{origin}: {dup.size} duplicate rows at {_rows_text(src, ep, st, dup)}")
    return selection


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
                f"selection names source {source!r} ({rows.size} rows, e.g. {_rows_text(src, ep, st, rows, 2)}) "
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
                f"{prior.uri_of(key)}: {_rows_text(src, ep, st, rows[unknown])}"
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


# -- training --------------------------------------------------------------------------------


def make_sharded_train_step(spec: PolicySpec, adam: AdamConfig, all_reduce: Callable[[torch.Tensor], None]) -> Callable:
    """The data-parallel form of ``make_train_step``'s step (normalize="weights").

    ``step(params, opt_state, obs, act, weights, total_weight)``: each worker holds a slice of
    the global batch and differentiates ``sum(w * nll) / total_weight`` over its slice;
    ``all_reduce`` sums gradients and losses in place across workers, so every worker applies
    the gradient of the global batch's weighted mean loss: the same update as one process.
    """

    def local_loss(p, obs, act, w, total_w):
        mean, log_std = policy_forward(p, obs, spec)
        return (w * tanh_gaussian_nll(mean, log_std, act)).sum() / total_w

    grad_and_loss = torch.func.grad_and_value(local_loss)

    def step(params: Params, opt_state: dict, obs, act, weights, total_weight):
        grads, loss = grad_and_loss(params, obs, act, weights, total_weight)
        names = list(grads)
        flat = torch.cat([grads[k].reshape(-1) for k in names] + [loss.reshape(1)])
        all_reduce(flat)
        out, offset = {}, 0
        for k in names:
            n = grads[k].numel()
            out[k] = flat[offset : offset + n].view_as(grads[k])
            offset += n
        params, opt_state = adam_update(params, out, opt_state, adam)
        return params, opt_state, flat[-1]

    return step


def _check_resume(state: dict, cfg: TrainConfig, spec: PolicySpec) -> None:
    saved = {k: v for k, v in state["meta"].get("config", {}).items() if k not in RESUMABLE_CHANGES}
    now = {k: v for k, v in fingerprint_config(cfg).items() if k not in RESUMABLE_CHANGES}
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(f"checkpoint at step {state['step']} was made with a different config (fields {diff}); "
                         "start a fresh run instead of resuming")
    saved_spec = ckpt.spec_from_dict(state["meta"]["spec"])
    if saved_spec != spec:
        raise ValueError(f"checkpoint policy {saved_spec} does not match the data/config {spec}")
    if state["step"] > cfg.steps:
        raise ValueError(f"checkpoint is at step {state['step']}, past the configured {cfg.steps} steps")


def train_policy(
    data: TrainingData,
    cfg: TrainConfig,
    resume_from: dict | None = None,
    checkpoint_fn: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    device: torch.device | str | None = None,
) -> tuple[Params, Normalizer, list[dict]]:
    """Train one policy; returns ``(params, normalizer, history)``.

    ``history``: ``[{"step": s, "loss": mean batch loss over the last log_every steps}, ...]``.
    ``resume_from``: a training checkpoint dict (see :mod:`distcur.policy.checkpoint`); the run
    continues at its step with its params and Adam state and ends exactly where an
    uninterrupted run ends. ``checkpoint_fn(state)`` receives a checkpoint every
    ``cfg.checkpoint_every`` steps and at the end; ``on_step(step)`` runs after each step
    (progress, fault injection). With ``world_size > 1`` (Ray Train) each worker takes the
    rows ``rank::world_size`` of every global batch and ``all_reduce`` sums gradients.
    ``device``: where to compute (default ``cfg.device`` resolved here; Ray Train passes the
    worker's); checkpoints and the returned params are always on the CPU.
    """
    spec = data.policy_spec(cfg.hidden)
    config_dict = fingerprint_config(cfg)
    device = torch.device(device) if device is not None else resolve_device(cfg.device, "TrainConfig.device")
    if resume_from is not None:
        _check_resume(resume_from, cfg, spec)
        params, _, normalizer = ckpt.unpack(resume_from)
        opt_state = {k: (dict(v) if isinstance(v, dict) else v) for k, v in resume_from["adam"].items()}
        start = int(resume_from["step"])
        history = list(resume_from["meta"].get("history", []))
        acc_sum, acc_n = resume_from["meta"].get("log_acc", [0.0, 0])
        log.info("resuming training at step %d of %d", start, cfg.steps)
    else:
        normalizer = data.fit_normalizer(cfg.action_bounds)
        params = init_params(spec, cfg.seed)
        opt_state = adam_init(params)
        start, history, acc_sum, acc_n = 0, [], 0.0, 0
    params = {k: v.to(device) for k, v in params.items()}
    opt_state = _to_device(opt_state, device)
    obs = torch.from_numpy(normalizer.state(data.obs)).to(device)
    act = torch.from_numpy(normalizer.action(data.act)).to(device)
    sampler = MixtureSampler(data.n_target, data.prior_weight, cfg.alpha, cfg.batch_size, cfg.seed, cfg.weighting,
                             cfg.mixing)
    adam = AdamConfig(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if world_size > 1:
        if all_reduce is None:
            raise ValueError("world_size > 1 needs an all_reduce function")
        step_fn = make_sharded_train_step(spec, adam, all_reduce)
    else:
        step_fn = make_train_step(spec, adam, functional=False)  # one model: the cheaper eager step

    def state_at(step: int) -> dict:
        meta = {"config": config_dict, "sampler": {**sampler.state(), "step": step}, "history": list(history),
                "log_acc": [acc_sum, acc_n], "data": {"n_target": data.n_target, "n_prior": data.n_prior,
                                                      "inputs": dict(data.inputs)}, "action_norm": data.action_norm}
        return ckpt.make_state(_to_device(params, "cpu"), spec, normalizer, step, _to_device(opt_state, "cpu"), meta)

    progress = bar(total=cfg.steps, initial=start, desc="policy training", unit="step", disable=rank != 0)
    for step in range(start, cfg.steps):
        idx, w = sampler.batch(step)
        w_t = torch.from_numpy(w).to(device)
        if device.type != "cpu":
            idx = torch.from_numpy(np.asarray(idx, np.int64)).to(device)
        if world_size > 1:
            mine = slice(rank, None, world_size)
            params, opt_state, loss = step_fn(params, opt_state, obs[idx[mine]], act[idx[mine]], w_t[mine], w_t.sum())
        else:
            params, opt_state, loss = step_fn(params, opt_state, obs[idx], act[idx], w_t)
        acc_sum, acc_n = acc_sum + float(loss), acc_n + 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            history.append({"step": done, "loss": acc_sum / acc_n})
            acc_sum, acc_n = 0.0, 0
            progress.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)
        progress.update()
        if checkpoint_fn is not None and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            checkpoint_fn(state_at(done))
        if on_step is not None:
            on_step(done)
    progress.close()
    return _to_device(params, "cpu"), normalizer, history


def _to_device(tree, device):
    """A dict of tensors (nested, as Adam's state) on ``device``; a no-op for tensors already there."""
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree


def final_state(params: Params, normalizer: Normalizer, cfg: TrainConfig, data: TrainingData, history: list[dict]) -> dict:
    """The checkpoint dict of a finished policy (no optimiser state)."""
    spec = data.policy_spec(cfg.hidden)
    meta = {"config": fingerprint_config(cfg), "history": history,
            "data": {"n_target": data.n_target, "n_prior": data.n_prior, "inputs": dict(data.inputs)},
            "action_norm": data.action_norm}
    return ckpt.make_state(params, spec, normalizer, cfg.steps, None, meta)


def write_policy(store: Store, run: str, state: dict, cfg: TrainConfig, inputs: dict[str, str], wall_s: float) -> Manifest:
    """Write ``policies/<run>/policy.pt`` and commit it with a manifest (stage "train")."""
    key = ckpt.save_policy(store, run, state)
    manifest = Manifest(stage=STAGE, config=fingerprint_config(cfg), inputs=dict(inputs), files=[key],
                        rows=int(state["meta"]["data"]["n_target"] + state["meta"]["data"]["n_prior"]),
                        metadata={"history": state["meta"]["history"][-5:]}, wall_s=round(wall_s, 3))
    store.write_text(f"{policy_key(run)}/manifest.json", manifest.to_json())
    return manifest


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
    state = ckpt.latest_checkpoint(store, run) if resume else None
    if state is not None and state["meta"].get("data", {}).get("inputs") != data.inputs:
        raise ValueError(f"checkpoint of run {run!r} was trained on other inputs; use another run name or resume=False")
    t0 = time.time()
    params, normalizer, history = train_policy(
        data, cfg, resume_from=state, checkpoint_fn=lambda s: ckpt.save_checkpoint(store, run, s), on_step=on_step
    )
    return write_policy(store, run, final_state(params, normalizer, cfg, data, history), cfg, data.inputs, time.time() - t0)


def config_from_state(state: dict) -> TrainConfig:
    """The TrainConfig recorded in a checkpoint's metadata."""
    return TrainConfig(**{k: v for k, v in state["meta"]["config"].items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})


__all__ = [
    "BASELINES",
    "TrainConfig",
    "TrainingData",
    "baseline_selection",
    "check_selection",
    "config_from_state",
    "fingerprint_config",
    "load_training_data",
    "make_sharded_train_step",
    "read_selection",
    "train_policy",
    "train_to_store",
    "write_policy",
]

