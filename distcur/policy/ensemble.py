"""Many policies trained at once in one process: stacked parameters, per-model sample weights.

The regression datamodels train hundreds of small policies, each on a different subset of the
prior. Here k of them share every minibatch (the same rows of the pool) and differ only in
their per-sample weights: a row of cluster g has weight ``masks[model, g]`` (0 drops it, 1
keeps it), and rows of group -1 (the injected target half) weigh 1 in every model. The step is
:func:`train_ensemble`: one loss over all k models (:func:`stacked_forward`), so the k models'
matrix products run as one GEMM (first layer) or one batched GEMM (later layers) instead of k
small ones. It equals :func:`train_single` (the functional step, one model at a time).

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
    tanh_gaussian_nll,
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


_ALLOCATOR_TUNED = False


def keep_freed_memory() -> None:
    """Stop glibc from returning freed buffers to the OS after every step (once per process).

    A step over k stacked models allocates and frees several (k, B, H) activations (8 MiB at
    k = 64, H = 128). With glibc's defaults those are trimmed from the heap top or unmapped when
    freed, and the next step page-faults them back in, zeroed: measured 10x slower elementwise
    ops inside the step than outside it. Raising the mmap and trim thresholds keeps the pages
    (RSS stays at the peak step's, which it reaches anyway). A no-op off glibc.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum, 32 MiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def stacked_forward(params: Params, obs: torch.Tensor, spec: PolicySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log_std), each (k, B, action_dim), of k stacked policies on the same ``obs`` (B, ds).

    Every layer is one batched GEMM over the k models (the shared input broadcast, not copied,
    into the first), producing contiguous (k, B, H) activations: a single (B x ds) @ (ds x kH)
    first layer was tried, and its strided (k, B, H) view made the elementwise ops and their
    backward copy. Same function as :func:`~distcur.policy.functional.policy_forward` per model.
    """
    w0 = params["h0.w"]
    x = torch.relu(torch.baddbmm(params["h0.b"].unsqueeze(1), obs.expand(w0.shape[0], *obs.shape), w0.transpose(1, 2)))
    for i in range(1, len(spec.hidden)):
        x = torch.relu(torch.baddbmm(params[f"h{i}.b"].unsqueeze(1), x, params[f"h{i}.w"].transpose(1, 2)))
    head_w = torch.cat([params["mean.w"], params["log_std.w"]], 1)
    head_b = torch.cat([params["mean.b"], params["log_std.b"]], 1).unsqueeze(1)
    mean, log_std = torch.baddbmm(head_b, x, head_w.transpose(1, 2)).split(spec.action_dim, -1)
    return mean, torch.clamp(log_std, spec.log_std_min, spec.log_std_max)


def _stacked_adam_(params: Params, grads: Params, state: dict, cfg: AdamConfig) -> None:
    """In-place Adam on stacked tensors (leading model axis; ``state["t"]`` is per model), the
    arithmetic of :func:`~distcur.policy.functional.adam_update`, whose equality
    ``test_vectorised_training_equals_each_model_alone`` checks. It is a twin rather than a call
    because the allocating update (differentiable, which this loop never needs) made the whole
    k = 64 step 25% slower (measured: 530 vs 699 model-steps/s at 2 x 128)."""
    state["t"] += 1
    t = state["t"]
    for name, p in params.items():
        g = grads[name]
        if cfg.weight_decay:
            g = g + cfg.weight_decay * p
        shape = (-1,) + (1,) * (p.dim() - 1)
        bc1 = (1 - cfg.beta1**t).to(p.dtype).view(shape)
        bc2 = (1 - cfg.beta2**t).to(p.dtype).view(shape)
        m, v = state["m"][name], state["v"][name]
        m.mul_(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
        v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        p.sub_(cfg.lr * (m / bc1) / ((v / bc2).sqrt_().add_(cfg.eps)))


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
    model sees exactly its subset (plus the injected rows). The inputs are not modified.

    The k models' losses are summed into one scalar and differentiated once: the models share
    no parameter, so each model's gradient is that of its own loss. With the forward of
    :func:`stacked_forward` every step is three GEMM-shaped products per layer over all k
    models at once, plus elementwise work on (k, B, H) tensors and an in-place Adam.
    """
    k = next(iter(params.values())).shape[0]
    if masks.shape[0] != k:
        raise ValueError(f"train_ensemble: masks has {masks.shape[0]} rows for {k} stacked models")
    if int(group.max()) >= masks.shape[1]:
        raise ValueError(f"train_ensemble: group ids reach {int(group.max())} but masks has {masks.shape[1]} columns")
    if normalize not in ("weights", "batch"):
        raise ValueError(f"normalize must be 'weights' or 'batch', got {normalize!r}")
    keep_freed_memory()
    masks = masks.to(obs.dtype)
    params = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    opt_state = {"m": {n: t.clone() for n, t in opt_state["m"].items()},
                 "v": {n: t.clone() for n, t in opt_state["v"].items()}, "t": opt_state["t"].clone()}
    names = list(params)
    losses = []
    for idx in batches:
        rows = torch.as_tensor(idx)
        w = batch_weights(masks, group[rows])
        mean, log_std = stacked_forward(params, obs[rows], spec)
        nll = tanh_gaussian_nll(mean, log_std, act[rows])  # (k, B)
        if normalize == "weights":
            loss = (w * nll).sum(1) / w.sum(1).clamp_min(1e-12)
        else:
            loss = (w * nll).mean(1)
        grads = torch.autograd.grad(loss.sum(), [params[n] for n in names])
        with torch.no_grad():
            _stacked_adam_(params, dict(zip(names, grads)), opt_state, adam)
        losses.append(loss.detach())
    params = {n: t.detach() for n, t in params.items()}
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


def ensemble_loss(params: Params, spec: PolicySpec, obs: torch.Tensor, act: torch.Tensor,
                  proxy: str = "nll") -> torch.Tensor:
    """Each stacked model's proxy loss on the same (obs, act), (k,): the mean BC loss (``nll``)
    or the executed action's squared error (``mse``), as :func:`distcur.policy.proxy.proxy_loss`."""
    from distcur.policy.proxy import proxy_loss

    with torch.no_grad():
        return torch.func.vmap(lambda p: proxy_loss(p, spec, obs, act, proxy), in_dims=(0,))(params)
