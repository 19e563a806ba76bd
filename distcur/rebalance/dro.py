"""Loss-relative (DRO) group weighting, DoReMi / Re-Mix style (docs/methods.md, Balanced BC).

A reference policy is trained on group-balanced data. A proxy policy is then trained with
group weights alpha that follow the proxy's per-group excess loss over the reference:

    e_g = max(0, L_g(proxy) - L_g(reference))
    alpha_g <- alpha_g exp(eta e_g);  alpha <- alpha / sum(alpha)
    alpha <- (1 - s) alpha + s / G           (smoothing toward uniform)

and the final weights are the running average of alpha over the proxy's training steps. Both
policies train through the policy trainer's loop (:func:`distcur.policy.train.fit_steps`), the
proxy's weights set at each step by the update above.
Defaults are Re-Mix's OXE values eta = 0.2, s = 0.05. Batches are stratified (the same number
of samples from every group) so that each L_g is measured on every step, also for rare groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from distcur.policy.functional import (
    AdamConfig,
    Params,
    PolicySpec,
    adam_init,
    init_params,
    make_train_step,
    policy_forward,
    tanh_gaussian_nll,
)
from distcur.policy.train import fit_steps, train_weighted_bc
from distcur.progress import bar
from distcur.rebalance.frequency import frequency_weights
from distcur.rebalance.group import check_alpha, check_groups


@dataclass
class DROConfig:
    """Settings of :func:`dro_rebalance` (steps are optimiser steps of batch ``batch_size``)."""

    eta: float = 0.2
    smoothing: float = 0.05
    steps: int = 1000
    reference_steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    reference: str = "balanced"  # "balanced" (DoReMi's uniform-over-groups) or "data" (as sampled)

    def __post_init__(self):
        if not self.eta > 0:
            raise ValueError(f"DROConfig.eta must be > 0, got {self.eta}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"DROConfig.smoothing must be in (0, 1], got {self.smoothing}")
        if self.steps < 1 or self.reference_steps < 1 or self.batch_size < 2:
            raise ValueError(f"DROConfig: steps, reference_steps >= 1 and batch_size >= 2 required, got {self}")
        if self.reference not in ("balanced", "data"):
            raise ValueError(f"DROConfig.reference must be 'balanced' or 'data', got {self.reference!r}")


@dataclass
class DROResult:
    alpha: np.ndarray  # (G,) final weights: running average of alpha
    history: np.ndarray  # (steps, G) alpha after each update
    excess: np.ndarray  # (steps, G) excess losses e_g
    reference_loss: list[float] = field(default_factory=list)  # per group, on the whole data
    proxy_params: Params | None = None  # the proxy policy, trained with the evolving alpha


def dro_update(alpha: np.ndarray, excess: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """One exponentiated-gradient step on the simplex, then smoothing toward uniform."""
    alpha = check_alpha(alpha, atol=1e-4)
    excess = np.asarray(excess, np.float64)
    if excess.shape != alpha.shape:
        raise ValueError(f"excess has shape {excess.shape}, expected {alpha.shape} (one per group)")
    if not np.isfinite(excess).all():
        bad = int(np.flatnonzero(~np.isfinite(excess))[0])
        raise ValueError(f"non-finite excess loss {excess[bad]} for group {bad}")
    if (excess < 0).any():
        raise ValueError(f"excess losses must be >= 0 (clipped at 0), got {excess.tolist()}")
    logits = np.log(alpha) + eta * excess
    new = np.exp(logits - logits.max())
    new /= new.sum()
    return (1 - smoothing) * new + smoothing / len(alpha)


def per_sample_nll(params: Params, obs: torch.Tensor, act: torch.Tensor, spec: PolicySpec) -> torch.Tensor:
    mean, log_std = policy_forward(params, obs, spec)
    return tanh_gaussian_nll(mean, log_std, act)


def group_mean_losses(nll: torch.Tensor, group: torch.Tensor, num_groups: int) -> np.ndarray:
    """Mean loss of each group (G,); a ValueError names any group with a non-finite loss."""
    sums = torch.zeros(num_groups, dtype=nll.dtype).index_add_(0, group, nll)
    counts = torch.bincount(group, minlength=num_groups).clamp_min(1).to(nll.dtype)
    out = (sums / counts).detach().cpu().numpy().astype(np.float64)
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ValueError(f"non-finite loss {out[bad]} for group {bad}: check the states/actions of that group")
    return out


def check_finite_inputs(obs: np.ndarray, act: np.ndarray, group: np.ndarray) -> None:
    """NaN/inf states or actions would make every loss NaN: name the first bad row and its group."""
    for name, x in (("state", obs), ("action", act)):
        bad = ~np.isfinite(np.asarray(x, np.float64)).all(1)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"non-finite {name} at row {i} (group {int(group[i])}): {np.asarray(x)[i].tolist()}")


def stratified_batch(members: Sequence[np.ndarray], per_group: int, rng: np.random.Generator) -> np.ndarray:
    """``per_group`` indices drawn with replacement from each group's member list."""
    return np.concatenate([m[rng.integers(len(m), size=per_group)] for m in members])


def dro_rebalance(
    obs: np.ndarray,
    act: np.ndarray,
    group: np.ndarray,
    num_groups: int,
    spec: PolicySpec,
    cfg: DROConfig | None = None,
    seed: int = 0,
    reference_params: Params | None = None,
) -> DROResult:
    """DoReMi-style group weights (G,) for ``obs`` (N, ds), ``act`` (N, da), ``group`` (N,)."""
    cfg = cfg or DROConfig()
    check_groups(group, num_groups)
    check_finite_inputs(obs, act, group)
    G = num_groups
    if reference_params is None:
        ref_w = frequency_weights(group, G) if cfg.reference == "balanced" else None
        reference_params = train_weighted_bc(obs, act, ref_w, spec, cfg.reference_steps, cfg.batch_size, cfg.lr,
                                             seed=seed + 1000)
    obs_t, act_t = torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(act, dtype=torch.float32)
    group_t = torch.as_tensor(np.asarray(group), dtype=torch.int64)
    with torch.no_grad():
        ref_full = group_mean_losses(per_sample_nll(reference_params, obs_t, act_t, spec), group_t, G)
    members = [np.flatnonzero(group == g) for g in range(G)]
    per_group = max(1, cfg.batch_size // G)
    rng = np.random.default_rng(seed)
    params = init_params(spec, seed)
    opt = adam_init(params)
    step_fn = make_train_step(spec, AdamConfig(lr=cfg.lr), normalize="batch", functional=False)
    alpha = np.full(G, 1.0 / G)
    history = np.zeros((cfg.steps, G))
    excess_hist = np.zeros((cfg.steps, G))

    def batch(t: int, params: Params) -> tuple:
        """The step's stratified batch, weighted by alpha after its DRO update from the proxy's losses."""
        nonlocal alpha
        idx = torch.as_tensor(stratified_batch(members, per_group, rng))
        o, a, g = obs_t[idx], act_t[idx], group_t[idx]
        with torch.no_grad():
            proxy_l = group_mean_losses(per_sample_nll(params, o, a, spec), g, G)
            ref_l = group_mean_losses(per_sample_nll(reference_params, o, a, spec), g, G)
        excess = np.maximum(proxy_l - ref_l, 0.0)
        alpha = dro_update(alpha, excess, cfg.eta, cfg.smoothing)
        history[t], excess_hist[t] = alpha, excess
        # Equal counts per group, so weight G alpha_g per sample makes the batch loss sum_g alpha_g L_g.
        return o, a, torch.as_tensor(G * alpha[g.numpy()], dtype=torch.float32)

    with bar(total=cfg.steps, desc="DRO rebalancing", unit="step") as progress:
        params, _ = fit_steps(params, opt, step_fn, batch, cfg.steps, after_step=lambda *_: progress.update())
    final = history.mean(0)
    final /= final.sum()
    return DROResult(alpha=check_alpha(final), history=history, excess=excess_hist, reference_loss=ref_full.tolist(),
                     proxy_params=params)
