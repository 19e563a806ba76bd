"""Many policies trained at once in one process: stacked parameters, per-model sample weights.

The regression datamodels train hundreds of small policies, each on a different subset of the
prior. Here k of them share every minibatch (the same rows of the pool) and differ only in
their per-sample weights: a row of cluster g has weight ``masks[model, g]`` (0 drops it, 1
keeps it), and rows of group -1 (the injected target half) weigh 1 in every model. The step is
:func:`distcur.policy.functional.make_train_step` under ``torch.func.vmap``, so the k models'
matrix products run as one batched GEMM per layer instead of k small ones.

Shapes: ``obs`` (N, ds), ``act`` (N, da), ``group`` (N,) int64 in -1..G-1, ``masks`` (k, G),
``batches`` (steps, B) int64 row indices into the pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from distcur.policy.functional import (
    AdamConfig,
    Params,
    PolicySpec,
    adam_init,
    init_params,
    make_train_step,
    stack_params,
)


def sample_batches(group: np.ndarray, steps: int, batch_size: int, fixed_fraction: float, seed: int) -> np.ndarray:
    """(steps, batch_size) row indices: ``round(fixed_fraction * B)`` rows of group -1 per batch,
    the rest uniformly from the rows of group >= 0 (with replacement); a pool without rows of
    one kind draws all rows from the other. A pure function of ``seed``."""
    group = np.asarray(group)
    fixed = np.flatnonzero(group < 0)
    free = np.flatnonzero(group >= 0)
    n_fixed = int(round(fixed_fraction * batch_size)) if len(fixed) else 0
    if len(free) == 0:
        n_fixed = batch_size
    rng = np.random.default_rng(seed)
    parts = []
    if n_fixed:
        parts.append(fixed[rng.integers(0, len(fixed), size=(steps, n_fixed))])
    if batch_size - n_fixed:
        parts.append(free[rng.integers(0, len(free), size=(steps, batch_size - n_fixed))])
    return np.concatenate(parts, axis=1).astype(np.int64)


def batch_weights(masks: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per-model weights of a batch, (k, B): ``masks[:, group]``, and 1 where group == -1."""
    picked = masks[:, group.clamp_min(0)]
    return torch.where(group.unsqueeze(0) >= 0, picked, torch.ones_like(picked))


def init_ensemble(spec: PolicySpec, seeds: Sequence[int], dtype: torch.dtype = torch.float32) -> tuple[Params, dict]:
    """Stacked parameters (leading axis k) from per-model seeds, and their stacked Adam state."""
    params = stack_params([init_params(spec, int(s), dtype) for s in seeds])
    state = adam_init(params)
    state["t"] = torch.zeros(len(seeds), dtype=torch.float64)
    return params, state


def train_ensemble(
    params: Params,
    opt_state: dict,
    spec: PolicySpec,
    adam: AdamConfig,
    obs: torch.Tensor,
    act: torch.Tensor,
    group: torch.Tensor,
    masks: torch.Tensor,
    batches: np.ndarray,
    normalize: str = "weights",
) -> tuple[Params, dict, torch.Tensor]:
    """Train k stacked models for ``len(batches)`` Adam steps; returns (params, opt_state, losses (steps, k)).

    With ``normalize="weights"`` each model's loss is the mean over the rows it keeps, so a
    model sees exactly its subset (plus the injected rows)."""
    k = next(iter(params.values())).shape[0]
    if masks.shape[0] != k:
        raise ValueError(f"train_ensemble: masks has {masks.shape[0]} rows for {k} stacked models")
    if int(group.max()) >= masks.shape[1]:
        raise ValueError(f"train_ensemble: group ids reach {int(group.max())} but masks has {masks.shape[1]} columns")
    masks = masks.to(obs.dtype)
    step = torch.func.vmap(make_train_step(spec, adam, normalize), in_dims=(0, 0, None, None, 0))
    losses = []
    with torch.no_grad():
        for idx in batches:
            rows = torch.as_tensor(idx)
            w = batch_weights(masks, group[rows])
            params, opt_state, loss = step(params, opt_state, obs[rows], act[rows], w)
            losses.append(loss)
    return params, opt_state, torch.stack(losses) if losses else torch.zeros(0, k)


def train_single(
    params: Params,
    opt_state: dict,
    spec: PolicySpec,
    adam: AdamConfig,
    obs: torch.Tensor,
    act: torch.Tensor,
    group: torch.Tensor,
    mask: torch.Tensor,
    batches: np.ndarray,
    normalize: str = "weights",
) -> tuple[Params, dict, torch.Tensor]:
    """The same training for one model (a plain loop): the reference the ensemble must equal."""
    step = make_train_step(spec, adam, normalize)
    mask = mask.to(obs.dtype).unsqueeze(0)
    losses = []
    with torch.no_grad():
        for idx in batches:
            rows = torch.as_tensor(idx)
            w = batch_weights(mask, group[rows])[0]
            params, opt_state, loss = step(params, opt_state, obs[rows], act[rows], w)
            losses.append(loss)
    return params, opt_state, torch.stack(losses) if losses else torch.zeros(0)


def ensemble_loss(params: Params, spec: PolicySpec, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Mean BC loss of each stacked model on the same (obs, act), (k,)."""
    from distcur.policy.functional import bc_loss

    with torch.no_grad():
        return torch.func.vmap(lambda p: bc_loss(p, obs, act, spec), in_dims=(0,))(params)
