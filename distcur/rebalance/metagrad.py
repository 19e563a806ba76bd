"""Meta-gradient rebalancing (docs/methods.md, Balanced BC; the seed paper's method).

Group weights alpha = softmax(theta) on the simplex; a batch holds the same number of samples
from every group and sample i weighs G alpha_{g(i)}, so the batch loss is sum_g alpha_g L_g.
The objective is *balanced*: the mean over groups of the per-group BC loss on held-out
validation data (over all groups, or over ``objective_groups``: the trusted ones, when some
groups may hold corrupted demos that no weighting by size or loss can tell apart). Each outer round

1. takes d objective / d alpha by reverse mode through K training steps from the current
   policy (DataMIL's engine, :func:`distcur.datamodels.metagrad.weight_meta_gradient`);
2. moves theta against that gradient (chain rule through the softmax); steps are scaled so
   that the first round's largest logit change is ``meta_lr`` and clipped to it afterwards,
   so they shrink as the gradient does near the optimum;
3. trains the policy on the same K batches with the new weights, so the next meta-gradient is
   taken further along training.

The weights start uniform over groups (``init="uniform"``, i.e. group-frequency weighting) or
at the data's own group shares (``init="data"``, i.e. uniform BC).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from distcur.datamodels.metagrad import weight_meta_gradient
from distcur.policy.functional import (
    AdamConfig,
    Params,
    PolicySpec,
    adam_init,
    bc_loss,
    init_params,
    make_train_step,
)
from distcur.policy.train import fit_steps
from distcur.progress import bar
from distcur.rebalance.dro import check_finite_inputs, stratified_batch
from distcur.rebalance.group import check_alpha, check_groups

INITS = ("uniform", "data")


@dataclass
class MetaGradConfig:
    """Settings of :func:`metagrad_rebalance`."""

    outer_steps: int = 8
    inner_steps: int = 20  # K: training steps differentiated through per round
    warmup_steps: int = 200  # plain training before the first meta-gradient
    batch_size: int = 128
    lr: float = 1e-3
    meta_lr: float = 0.5  # largest change of a logit in the first round
    init: str = "uniform"
    val_fraction: float = 0.2
    val_max_per_group: int = 512
    # Groups whose validation loss the objective averages (None: all). Name the groups you trust
    # (e.g. curated demos) and the weights of the others are judged by what they do to those.
    objective_groups: tuple[int, ...] | None = None
    checkpoint_every: int | None = None  # steps per recomputed segment (None: whole graph)

    def __post_init__(self):
        if self.outer_steps < 1 or self.inner_steps < 1 or self.warmup_steps < 0 or self.batch_size < 2:
            raise ValueError(f"MetaGradConfig: need outer_steps, inner_steps >= 1, warmup_steps >= 0, got {self}")
        if self.init not in INITS:
            raise ValueError(f"MetaGradConfig.init must be one of {INITS}, got {self.init!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"MetaGradConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.meta_lr > 0:
            raise ValueError(f"MetaGradConfig.meta_lr must be > 0, got {self.meta_lr}")


@dataclass
class MetaGradResult:
    alpha: np.ndarray  # (G,) final group weights: mean of alpha over the second half of the rounds
    history: np.ndarray  # (outer_steps + 1, G) alpha before each round and after the last
    objective: list[float] = field(default_factory=list)  # balanced validation loss per round
    val_loss: np.ndarray | None = None  # (outer_steps, G) per-group validation loss per round
    params: Params | None = None  # the policy trained along the way


def split_validation(
    group: np.ndarray, num_groups: int, fraction: float, seed: int, episode: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, val) masks: per group, ``fraction`` of its episodes (of its rows when no
    episode ids are given, or the group has a single episode) go to validation; each side keeps
    at least one row of every group."""
    rng = np.random.default_rng([seed, 11])
    val = np.zeros(len(group), bool)
    for g in range(num_groups):
        rows = np.flatnonzero(group == g)
        if len(rows) < 2:
            raise ValueError(f"group {g} has {len(rows)} sample(s); a train/validation split needs at least 2")
        units = episode[rows] if episode is not None else rows
        uniq = np.unique(units)
        if len(uniq) < 2:
            units, uniq = rows, rows
        n_val = min(len(uniq) - 1, max(1, int(round(fraction * len(uniq)))))
        chosen = rng.choice(uniq, size=n_val, replace=False)
        val[rows[np.isin(units, chosen)]] = True
    return ~val, val


def _softmax(theta: np.ndarray) -> np.ndarray:
    e = np.exp(theta - theta.max())
    return e / e.sum()


def metagrad_rebalance(
    obs: np.ndarray,
    act: np.ndarray,
    group: np.ndarray,
    num_groups: int,
    spec: PolicySpec,
    cfg: MetaGradConfig | None = None,
    seed: int = 0,
    episode: np.ndarray | None = None,
) -> MetaGradResult:
    """Group weights (G,) for ``obs`` (N, ds), ``act`` (N, da), ``group`` (N,) that minimise the
    balanced validation BC loss after training, found by meta-gradients."""
    cfg = cfg or MetaGradConfig()
    G = num_groups
    check_groups(group, G)
    group = np.asarray(group, np.int64)
    train, val = split_validation(group, G, cfg.val_fraction, seed, episode)
    check_finite_inputs(obs, act, group)
    obs_t, act_t = torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(act, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(train & (group == g)) for g in range(G)]
    val_sets = []
    for g in range(G):
        rows = np.flatnonzero(val & (group == g))
        if len(rows) > cfg.val_max_per_group:
            rows = rng.choice(rows, cfg.val_max_per_group, replace=False)
        val_sets.append((obs_t[rows], act_t[rows]))

    def per_group_val(p: Params) -> torch.Tensor:
        return torch.stack([bc_loss(p, o, a, spec) for o, a in val_sets])

    judged = sorted({int(g) for g in cfg.objective_groups}) if cfg.objective_groups is not None else list(range(G))
    if not judged or not 0 <= judged[0] <= judged[-1] < G:
        raise ValueError(f"MetaGradConfig.objective_groups must be a non-empty subset of 0..{G - 1}, "
                         f"got {cfg.objective_groups}")
    judged = torch.as_tensor(judged)

    def balanced_objective(p: Params) -> torch.Tensor:
        return per_group_val(p)[judged].mean()

    counts = np.array([len(m) for m in members], np.float64)
    alpha0 = np.full(G, 1.0 / G) if cfg.init == "uniform" else counts / counts.sum()
    theta = np.log(alpha0)
    per_group = max(1, cfg.batch_size // G)
    adam = AdamConfig(lr=cfg.lr)
    step = make_train_step(spec, adam, normalize="batch", functional=False)
    params = init_params(spec, seed)
    opt = adam_init(params)

    def make_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = stratified_batch(members, per_group, rng)
        return obs_t[idx], act_t[idx], torch.as_tensor(group[idx])

    def check_loss(_step: int, _params: Params, _opt: dict, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise ValueError("metagrad_rebalance: the training loss became non-finite")

    def train_on(batches, alpha: np.ndarray):
        """The policy trainer's loop (:func:`~distcur.policy.train.fit_steps`) over ``batches``, weighted by alpha."""
        nonlocal params, opt
        w = torch.as_tensor(G * alpha, dtype=torch.float32)

        def batch(i: int, _params: Params) -> tuple:
            o, a, g = batches[i]
            return o, a, w[g]

        params, opt = fit_steps(params, opt, step, batch, len(batches), after_step=check_loss)

    train_on([make_batch() for _ in range(cfg.warmup_steps)], alpha0)
    history, objective, val_losses = [_softmax(theta)], [], []
    scale: float | None = None
    for r in bar(range(cfg.outer_steps), desc="meta-gradient rebalancing", unit="round"):
        alpha = _softmax(theta)
        batches = [make_batch() for _ in range(cfg.inner_steps)]
        w = torch.as_tensor(G * alpha, dtype=torch.float32)
        with torch.no_grad():
            val_losses.append(per_group_val(params).numpy().astype(np.float64))
        if not np.isfinite(val_losses[-1]).all():
            bad = int(np.flatnonzero(~np.isfinite(val_losses[-1]))[0])
            raise ValueError(f"metagrad_rebalance: non-finite validation loss for group {bad} in round {r}")
        proxy, grad_w, _ = weight_meta_gradient(
            params, opt, spec, adam, batches, w, balanced_objective, cfg.checkpoint_every, normalize="batch"
        )
        grad_alpha = G * grad_w.detach().double().numpy()
        if not (np.isfinite(proxy) and np.isfinite(grad_alpha).all()):
            raise ValueError(f"metagrad_rebalance: non-finite meta-gradient in round {r}: {grad_alpha.tolist()}")
        objective.append(float(proxy))
        # d alpha / d theta = diag(alpha) - alpha alpha^T.
        grad_theta = alpha * (grad_alpha - alpha @ grad_alpha)
        if scale is None:
            scale = max(float(np.abs(grad_theta).max()), 1e-12)
        theta = theta - cfg.meta_lr * np.clip(grad_theta / scale, -1.0, 1.0)
        new_alpha = _softmax(theta)
        history.append(new_alpha)
        train_on(batches, new_alpha)
    # Iterate averaging over the second half of the rounds damps the noise of single estimates.
    tail = np.stack(history[1 + cfg.outer_steps // 2 :])
    final = check_alpha(tail.mean(0) / tail.mean(0).sum())
    return MetaGradResult(
        alpha=final, history=np.stack(history), objective=objective, val_loss=np.stack(val_losses), params=params
    )
