"""Weighted co-training of one policy on arrays: config, the training loop, selection checks.

The one weighted-BC loop is :func:`fit_steps`; :func:`train_policy` runs it with
:func:`~distcur.policy.functional.make_train_step` on batches from
:class:`~distcur.policy.sampler.MixtureSampler` (target with probability ``alpha``, else the
weighted prior selection); everything that decides the result is a function of the config's
seed, so a run is deterministic and a resumed run (params, Adam state, step) matches an
uninterrupted one exactly. The Ray Train path calls the same loop inside each worker, and the
rebalancing methods (:mod:`distcur.rebalance`) train through :func:`fit_steps` too.

Data: :class:`TrainingData` holds the arrays; the train stage (:mod:`distcur.stages.train`)
builds them from the store (the target's step source joined with a selection table of
:data:`~distcur.schema.SELECTION_SCHEMA`), which :func:`check_selection` validates, naming bad rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from distcur.config import to_dict
from distcur.devices import check_device, resolve_device
from distcur.policy import checkpoint as ckpt
from distcur.policy.actions import MODES as ACTION_MODES
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
from distcur.schema import SELECTION_SCHEMA

log = logging.getLogger(__name__)

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


def rows_text(src, ep, st, rows: np.ndarray, limit: int = 5) -> str:
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
        raise ValueError(f"{origin}: {bad.size} non-finite weights at {rows_text(src, ep, st, bad)}")
    bad = np.flatnonzero(w < 0)
    if bad.size:
        raise ValueError(f"{origin}: {bad.size} negative weights (e.g. {w[bad[0]]}) at {rows_text(src, ep, st, bad)}")
    dup = np.flatnonzero(pd.DataFrame({"s": src, "e": ep, "t": st}).duplicated().to_numpy())
    if dup.size:
        raise ValueError(f"{origin}: {dup.size} duplicate rows at {rows_text(src, ep, st, dup)}")
    return selection


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

    def batch(step: int, _params: Params) -> tuple:
        idx, w = sampler.batch(step)
        w_t = torch.from_numpy(w).to(device)
        if device.type != "cpu":
            idx = torch.from_numpy(np.asarray(idx, np.int64)).to(device)
        if world_size > 1:
            mine = slice(rank, None, world_size)
            return obs[idx[mine]], act[idx[mine]], w_t[mine], w_t.sum()
        return obs[idx], act[idx], w_t

    def after_step(done: int, p: Params, o: dict, loss: torch.Tensor) -> None:
        nonlocal params, opt_state, acc_sum, acc_n
        params, opt_state = p, o
        acc_sum, acc_n = acc_sum + float(loss), acc_n + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            history.append({"step": done, "loss": acc_sum / acc_n})
            acc_sum, acc_n = 0.0, 0
            progress.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)
        progress.update()
        if checkpoint_fn is not None and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            checkpoint_fn(state_at(done))
        if on_step is not None:
            on_step(done)

    params, opt_state = fit_steps(params, opt_state, step_fn, batch, cfg.steps, start, after_step)
    progress.close()
    return _to_device(params, "cpu"), normalizer, history


def fit_steps(params: Params, opt_state: dict, step_fn: Callable, batch: Callable[[int, Params], tuple], steps: int,
              start: int = 0, after_step: Callable[[int, Params, dict, torch.Tensor], None] | None = None
              ) -> tuple[Params, dict]:
    """THE weighted-BC loop: for each step in ``[start, steps)``, ``step_fn(params, opt_state,
    *batch(step, params))`` (a :func:`~distcur.policy.functional.make_train_step` step: the batch's
    states, actions and per-row weights), then ``after_step(step + 1, params, opt_state, loss)``.
    ``batch`` sees the current params, so a rebalancing can set the weights of each step from the
    policy's own losses (DRO); :func:`train_policy`, :func:`train_weighted_bc` and the rebalancing
    methods all train through it. Returns the final (params, opt_state)."""
    for step in range(start, steps):
        params, opt_state, loss = step_fn(params, opt_state, *batch(step, params))
        if after_step is not None:
            after_step(step + 1, params, opt_state, loss)
    return params, opt_state


def train_weighted_bc(
    obs: np.ndarray,
    act: np.ndarray,
    weights: np.ndarray | None,
    spec: PolicySpec,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
) -> Params:
    """BC on in-memory arrays with rows drawn with probability proportional to ``weights``.

    ``obs`` (N, ds) normalised states, ``act`` (N, da) actions in (-1, 1). The same weighted
    sampling the trainer's ``"sample"`` weighting uses; ``weights=None`` is uniform BC.
    """
    rng = np.random.default_rng(seed)
    n = len(obs)
    p = None
    if weights is not None:
        w = np.asarray(weights, np.float64)
        if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be (N,) = ({n},), finite, >= 0 and not all 0")
        p = w / w.sum()
    obs_t, act_t = torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(act, dtype=torch.float32)
    params = init_params(spec, seed)
    ones = torch.ones(batch_size)

    def batch(_step: int, _params: Params) -> tuple:
        idx = torch.as_tensor(rng.choice(n, size=batch_size, p=p))
        return obs_t[idx], act_t[idx], ones

    params, _ = fit_steps(params, adam_init(params), make_train_step(spec, AdamConfig(lr=lr), functional=False),
                          batch, steps)
    return params


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


def config_from_state(state: dict) -> TrainConfig:
    """The TrainConfig recorded in a checkpoint's metadata."""
    return TrainConfig(**{k: v for k, v in state["meta"]["config"].items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})


__all__ = [
    "TrainConfig",
    "TrainingData",
    "check_selection",
    "config_from_state",
    "final_state",
    "fingerprint_config",
    "fit_steps",
    "make_sharded_train_step",
    "train_policy",
    "train_weighted_bc",
]

