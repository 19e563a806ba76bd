"""Exact meta-gradients of a proxy metric with respect to per-group loss weights.

Training is K Adam steps of :func:`distcur.policy.functional.make_train_step`; sample j of
batch k weighs ``w[group_kj]`` in the loss (group -1: a fixed weight 1, e.g. the injected
target half). The meta-gradient is d proxy(params_K) / d w, by reverse mode through all K
steps. Memory is bounded by checkpointing: the forward pass keeps only the training state
(params, Adam moments) at every ``checkpoint_every``-th step; the backward pass recomputes one
segment at a time with autograd on, pulls the adjoint of the state back through it with one
``torch.autograd.grad`` call (a vector-Jacobian product), and accumulates d/dw. With c steps
per segment the memory is O(K / c) states + one segment's graph (c steps), minimal at
c ~ sqrt(K); the cost is one extra forward pass.

The DataMIL estimator on top (:func:`datamil_metagrad_scores`): train T - K steps forward only,
then insert a random half of the candidate clusters at weight 0 for the last K steps, take
d proxy / d w of the inserted clusters, repeat with fresh candidates, average per cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distcur.policy.ensemble import sample_batches
from distcur.policy.functional import AdamConfig, Params, PolicySpec, adam_init, init_params, make_train_step

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _state_leaves(params: Params, opt_state: dict) -> list[torch.Tensor]:
    keys = list(params)
    return [params[k] for k in keys] + [opt_state["m"][k] for k in keys] + [opt_state["v"][k] for k in keys]


def _from_leaves(leaves: list[torch.Tensor], keys: list[str], t: torch.Tensor) -> tuple[Params, dict]:
    n = len(keys)
    params = dict(zip(keys, leaves[:n]))
    opt = {"m": dict(zip(keys, leaves[n : 2 * n])), "v": dict(zip(keys, leaves[2 * n :])), "t": t}
    return params, opt


def _sample_weights(w: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    picked = w[group.clamp_min(0)]
    return torch.where(group >= 0, picked, torch.ones_like(picked))


def weight_meta_gradient(
    params: Params,
    opt_state: dict,
    spec: PolicySpec,
    adam: AdamConfig,
    batches: Sequence[Batch],
    w: torch.Tensor,
    proxy_fn: Callable[[Params], torch.Tensor],
    checkpoint_every: int | None = None,
    normalize: str = "batch",
) -> tuple[float, torch.Tensor, Params]:
    """(proxy after the K = len(batches) Adam steps, d proxy / d w (G,), final params).

    ``batches``: K tuples (obs (B, ds), act (B, da), group (B,) int64 in -1..G-1); the loss
    weight of a sample is ``w[group]`` (group -1: weight 1, no gradient). ``proxy_fn`` maps
    params to a scalar tensor (differentiable). ``checkpoint_every``: steps per recomputed
    segment; None stores no checkpoints inside the run (one segment, whole graph in memory),
    ``"sqrt"``-like behaviour is obtained with ``checkpoint_every=ceil(sqrt(K))``.
    ``normalize="batch"`` keeps the loss linear in each weight (see ``bc_loss``).
    The inputs are not modified; gradients flow in the dtype of ``params``.
    """
    if len(batches) == 0:
        raise ValueError("weight_meta_gradient: need at least one batch")
    if w.ndim != 1:
        raise ValueError(f"weight_meta_gradient: w must be (G,), got shape {tuple(w.shape)}")
    for i, (_, _, g) in enumerate(batches):
        if g.numel() and int(g.max()) >= w.shape[0]:
            raise ValueError(f"weight_meta_gradient: batch {i} has group {int(g.max())} but w has {w.shape[0]} entries")
    K = len(batches)
    seg = K if checkpoint_every is None else max(1, int(checkpoint_every))
    keys = list(params)
    step = make_train_step(spec, adam, normalize)
    w = w.detach()

    def run(state: list[torch.Tensor], t: torch.Tensor, w_: torch.Tensor, lo: int, hi: int):
        p, o = _from_leaves(state, keys, t)
        for obs, act, group in batches[lo:hi]:
            p, o, _ = step(p, o, obs, act, _sample_weights(w_, group))
        return _state_leaves(p, o), o["t"]

    # Forward, no graph: keep the state at each segment start.
    bounds = list(range(0, K, seg)) + [K]
    checkpoints = []
    state = [x.detach() for x in _state_leaves(params, opt_state)]
    t = opt_state["t"].detach()
    with torch.no_grad():
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            checkpoints.append((state, t))
            state, t = run(state, t, w, lo, hi)
    final_params, _ = _from_leaves(state, keys, t)

    # Adjoint of the final state: d proxy / d params_K (moments do not enter the proxy).
    leaf_params = {k: v.detach().requires_grad_(True) for k, v in final_params.items()}
    with torch.enable_grad():
        proxy = proxy_fn(leaf_params)
        g_params = torch.autograd.grad(proxy, [leaf_params[k] for k in keys], allow_unused=True)
    adjoint = [torch.zeros_like(p) if g is None else g for p, g in zip(final_params.values(), g_params)]
    adjoint += [torch.zeros_like(x) for x in state[len(keys) :]]

    # Backward over segments, last first: recompute, then one VJP per segment.
    dw = torch.zeros_like(w)
    for s in range(len(checkpoints) - 1, -1, -1):
        start, t0 = checkpoints[s]
        leaves = [x.detach().requires_grad_(True) for x in start]
        w_leaf = w.clone().requires_grad_(True)
        with torch.enable_grad():
            out, _ = run(leaves, t0, w_leaf, bounds[s], bounds[s + 1])
            pairs = [(o, a) for o, a in zip(out, adjoint) if o.requires_grad]
            grads = torch.autograd.grad(
                [o for o, _ in pairs], [*leaves, w_leaf], grad_outputs=[a for _, a in pairs], allow_unused=True
            )
        adjoint = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads[:-1])]
        if grads[-1] is not None:
            dw = dw + grads[-1]
    return float(proxy.detach()), dw, {k: v.detach() for k, v in final_params.items()}


def sqrt_checkpoint_every(k_steps: int) -> int:
    """The segment length that minimises checkpoint + segment memory, ceil(sqrt(K))."""
    return max(1, math.ceil(math.sqrt(k_steps)))


@dataclass
class MetagradRunConfig:
    """One DataMIL meta-gradient estimate (see :func:`datamil_metagrad_scores`)."""

    total_steps: int = 300  # T
    meta_steps: int = 30  # K, the last steps differentiated through
    iterations: int = 8  # fresh candidate halves; even counts pair each half with its complement
    candidate_fraction: float = 0.5
    batch_size: int = 256
    target_fraction: float = 0.25  # share of each batch from the injected target half
    checkpoint_every: int | None = None  # None: ceil(sqrt(K))
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.meta_steps <= self.total_steps:
            raise ValueError(f"need 0 < meta_steps <= total_steps, got K={self.meta_steps}, T={self.total_steps}")
        if self.iterations <= 0 or not 0 < self.candidate_fraction < 1:
            raise ValueError(f"need iterations > 0 and 0 < candidate_fraction < 1, got {self}")


def _candidate_halves(n_clusters: int, cfg: MetagradRunConfig) -> list[np.ndarray]:
    """Boolean candidate sets; iteration 2j+1 takes the complement of 2j when the fraction is 1/2,
    so every cluster is a candidate equally often."""
    rng = np.random.default_rng([cfg.seed, 7])
    out: list[np.ndarray] = []
    for it in range(cfg.iterations):
        if it % 2 == 1 and abs(cfg.candidate_fraction - 0.5) < 1e-9:
            out.append(~out[-1])
            continue
        c = np.zeros(n_clusters, bool)
        c[rng.permutation(n_clusters)[: max(1, int(round(cfg.candidate_fraction * n_clusters)))]] = True
        out.append(c)
    return out


def datamil_metagrad_scores(
    spec: PolicySpec,
    adam: AdamConfig,
    obs: torch.Tensor,
    act: torch.Tensor,
    cluster: torch.Tensor,
    n_clusters: int,
    proxy_fn: Callable[[Params], torch.Tensor],
    cfg: MetagradRunConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean d proxy / d w_i per cluster, (C,), and how many iterations scored it, (C,).

    The pool is ``obs``/``act`` (N, .) with ``cluster`` (N,) in 0..C-1, and -1 for the injected
    target rows (always weight 1). Per iteration: fresh init (seed + it), T - K forward steps on
    the target rows and the non-candidate clusters, then K steps where the candidates join the
    batches at weight 0 and the proxy is differentiated with respect to their weights. A
    negative mean (the proxy is a loss) means that up-weighting the cluster helps.
    """
    cluster_np = cluster.numpy()
    total = np.zeros(n_clusters)
    count = np.zeros(n_clusters, np.int64)
    ckpt = cfg.checkpoint_every or sqrt_checkpoint_every(cfg.meta_steps)
    step = make_train_step(spec, adam, "batch")
    for it, candidates in enumerate(_candidate_halves(n_clusters, cfg)):
        params = init_params(spec, cfg.seed + it, obs.dtype)
        opt = adam_init(params)
        seed = cfg.seed * 1_000_003 + it
        is_candidate = (cluster_np >= 0) & candidates[np.maximum(cluster_np, 0)]
        # Forward phase: the target rows and the non-candidate clusters, all at weight 1.
        fwd_rows = np.flatnonzero(~is_candidate)
        if cfg.total_steps > cfg.meta_steps and len(fwd_rows):
            fwd_group = np.where(cluster_np[fwd_rows] < 0, -1, 0)
            idx = fwd_rows[sample_batches(fwd_group, cfg.total_steps - cfg.meta_steps, cfg.batch_size,
                                          cfg.target_fraction, seed)]
            ones = torch.ones(cfg.batch_size, dtype=obs.dtype)
            with torch.no_grad():
                for b in idx:
                    rows = torch.as_tensor(b)
                    params, opt, _ = step(params, opt, obs[rows], act[rows], ones)
        # Meta phase: candidates enter at weight 0 with their own cluster ids; the rest weigh 1.
        meta_group = np.where(cluster_np >= 0, 0, -1)
        idx = sample_batches(meta_group, cfg.meta_steps, cfg.batch_size, cfg.target_fraction, seed + 17)
        group_t = torch.as_tensor(np.where(is_candidate, cluster_np, -1))
        batches = [(obs[torch.as_tensor(b)], act[torch.as_tensor(b)], group_t[torch.as_tensor(b)]) for b in idx]
        w = torch.ones(n_clusters, dtype=obs.dtype)
        w[torch.as_tensor(candidates)] = 0.0
        _, dw, _ = weight_meta_gradient(params, opt, spec, adam, batches, w, proxy_fn, ckpt, "batch")
        total[candidates] += dw.numpy()[candidates]
        count[candidates] += 1
    mean = np.divide(total, np.maximum(count, 1))
    return mean, count
