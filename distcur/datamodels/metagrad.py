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

Two DataMIL estimators on top, the ``recipe`` of :class:`MetagradRunConfig`:

* ``distcur`` (:func:`datamil_metagrad_scores`): train T - K steps forward only on the
  non-candidate clusters, then let a random half of the clusters (the candidates) join every
  batch of the last K steps at weight 0, take d proxy / d w of the candidates, repeat with fresh
  candidates (independent iterations), average per cluster;
* ``datamil`` (:func:`datamil_reference_scores`), the public reference code's recipe: T steps
  on a training pool of clusters (all of them at first), of which step T - K is one special
  batch holding every row of the candidates at weight 0; the loss is a sum over rows (not a
  mean), so a candidate row weighs in the special batch what a row weighs in a normal batch;
  after each iteration the candidates at or below the 20th percentile of its non-zero scores
  join the pool and those at or above the 80th leave it, so iteration i trains on a pool that
  iterations 0..i-1 decided: the iterations run in sequence. The score is the mean of a
  cluster's non-zero meta-gradients. With ``round_size`` R > 1 (:func:`round_pools`) the pool
  moves once per round of R iterations instead: the R iterations of a round all train on the
  pool the earlier rounds left (so they can run in parallel, as the Ray Train executor does),
  and the round's moves are applied afterwards in iteration order. R = 1 is the sequence.

Each iteration is a pure function of its inputs (:func:`metagrad_iteration`), so it can run on
any worker and be committed on its own (:mod:`distcur.stages.datamodel`, :class:`MetagradFold`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distcur.datamodels.subsets import SubsetTrainingData
from distcur.policy.ensemble import sample_batches
from distcur.policy.functional import (
    AdamConfig,
    Params,
    PolicySpec,
    adam_init,
    adam_update,
    bc_loss,
    init_params,
    lr_schedule,
    make_train_step,
)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
RECIPES = ("distcur", "datamil")


def _adams(adam: AdamConfig, lrs: Sequence[float] | None, n: int) -> list[AdamConfig]:
    """The Adam config of each of n steps: ``adam`` at learning rate ``lrs[i]`` (None: ``adam.lr``)."""
    if lrs is None:
        return [adam] * n
    if len(lrs) != n:
        raise ValueError(f"lrs has {len(lrs)} entries for {n} steps")
    return [dataclasses.replace(adam, lr=float(lr)) for lr in lrs]


def _step_fns(spec: PolicySpec, adam: AdamConfig, normalize: str, lrs: Sequence[float] | None,
              n: int) -> list:
    """n train steps, step i at learning rate ``lrs[i]`` (None: ``adam.lr`` throughout)."""
    return [make_train_step(spec, a, normalize) for a in _adams(adam, lrs, n)]


def _summed_grad(spec: PolicySpec, params: Params, obs: torch.Tensor, act: torch.Tensor, weights: torch.Tensor,
                 chunk_rows: int) -> Params:
    """d/dparams of the summed weighted NLL over (B, .) rows, accumulated ``chunk_rows`` at a time
    (the summed loss is additive over rows; differentiable with respect to params and weights)."""
    grad = torch.func.grad(lambda p, o, a, wt: bc_loss(p, o, a, spec, wt, "sum"))
    total: Params | None = None
    for lo in range(0, len(obs), chunk_rows):
        g = grad(params, obs[lo : lo + chunk_rows], act[lo : lo + chunk_rows], weights[lo : lo + chunk_rows])
        total = g if total is None else {k: total[k] + g[k] for k in g}
    return total


def _chunked_step_vjp(state: list[torch.Tensor], t: torch.Tensor, keys: list[str], spec: PolicySpec,
                      adam: AdamConfig, batch: Batch, w: torch.Tensor, adjoint: list[torch.Tensor],
                      chunk_rows: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pull ``adjoint`` (of the state after one summed-loss Adam step on ``batch``) back to the
    state before it and to w, holding one chunk's double-backward graph at a time: first through
    the Adam update (to the state and the step's gradient), then through each chunk's gradient."""
    obs, act, group = batch
    leaves = [x.detach().requires_grad_(True) for x in state]
    p, o = _from_leaves(leaves, keys, t)
    with torch.no_grad():
        g = _summed_grad(spec, {k: v.detach() for k, v in p.items()}, obs, act, _sample_weights(w, group), chunk_rows)
    g_leaf = {k: v.detach().requires_grad_(True) for k, v in g.items()}
    with torch.enable_grad():
        new_p, new_o = adam_update(p, g_leaf, o, adam)
        grads = torch.autograd.grad(_state_leaves(new_p, new_o), [*leaves, *g_leaf.values()], grad_outputs=adjoint,
                                    allow_unused=True)
    out = [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads[: len(leaves)])]
    adj_g = [torch.zeros_like(v) if d is None else d for v, d in zip(g_leaf.values(), grads[len(leaves) :])]
    dw = torch.zeros_like(w)
    for lo in range(0, len(obs), chunk_rows):
        p_leaf = {k: p[k].detach().requires_grad_(True) for k in keys}
        w_leaf = w.clone().requires_grad_(True)
        sl = slice(lo, lo + chunk_rows)
        with torch.enable_grad():
            gc = _summed_grad(spec, p_leaf, obs[sl], act[sl], _sample_weights(w_leaf, group[sl]), chunk_rows)
            d = torch.autograd.grad([gc[k] for k in keys], [*p_leaf.values(), w_leaf], grad_outputs=adj_g,
                                    allow_unused=True)
        for i, di in enumerate(d[: len(keys)]):
            if di is not None:
                out[i] = out[i] + di
        if d[-1] is not None:
            dw = dw + d[-1]
    return out, dw


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
    lrs: Sequence[float] | None = None,
    chunk_rows: int | None = None,
) -> tuple[float, torch.Tensor, Params]:
    """(proxy after the K = len(batches) Adam steps, d proxy / d w (G,), final params).

    ``batches``: K tuples (obs (B, ds), act (B, da), group (B,) int64 in -1..G-1); the loss
    weight of a sample is ``w[group]`` (group -1: weight 1, no gradient). ``proxy_fn`` maps
    params to a scalar tensor (differentiable). ``checkpoint_every``: steps per recomputed
    segment; None stores no checkpoints inside the run (one segment, whole graph in memory),
    ``"sqrt"``-like behaviour is obtained with ``checkpoint_every=ceil(sqrt(K))``.
    ``normalize="batch"`` or ``"sum"`` keeps the loss linear in each weight (see ``bc_loss``).
    ``lrs``: the learning rate of each step, (K,) (None: ``adam.lr``). Batches may differ in size.
    ``chunk_rows`` (with ``normalize="sum"``): a batch of more rows is its own segment, its gradient
    and its vector-Jacobian product computed ``chunk_rows`` rows at a time (same values, memory of
    one chunk: the reference recipe's special batch holds half the prior).
    The inputs are not modified; gradients flow in the dtype of ``params``.
    """
    if len(batches) == 0:
        raise ValueError("weight_meta_gradient: need at least one batch")
    if w.ndim != 1:
        raise ValueError(f"weight_meta_gradient: w must be (G,), got shape {tuple(w.shape)}")
    for i, (_, _, g) in enumerate(batches):
        if g.numel() and int(g.max()) >= w.shape[0]:
            raise ValueError(f"weight_meta_gradient: batch {i} has group {int(g.max())} but w has {w.shape[0]} entries")
    if chunk_rows is not None and (normalize != "sum" or chunk_rows < 1):
        raise ValueError(f"weight_meta_gradient: chunk_rows={chunk_rows} needs normalize='sum' (got {normalize!r}) "
                         "and a positive row count")
    K = len(batches)
    seg = K if checkpoint_every is None else max(1, int(checkpoint_every))
    keys = list(params)
    adams = _adams(adam, lrs, K)
    steps = [make_train_step(spec, a, normalize) for a in adams]
    chunked = [chunk_rows is not None and len(b[0]) > chunk_rows for b in batches]
    w = w.detach()

    def run(state: list[torch.Tensor], t: torch.Tensor, w_: torch.Tensor, lo: int, hi: int):
        p, o = _from_leaves(state, keys, t)
        for i in range(lo, hi):
            obs, act, group = batches[i]
            if chunked[i]:
                g = _summed_grad(spec, p, obs, act, _sample_weights(w_, group), chunk_rows)
                p, o = adam_update(p, g, o, adams[i])
            else:
                p, o, _ = steps[i](p, o, obs, act, _sample_weights(w_, group))
        return _state_leaves(p, o), o["t"]

    # Forward, no graph: keep the state at each segment start (a chunked step is a segment alone).
    cuts = set(range(0, K, seg)) | {i for i in range(K) if chunked[i]} | {i + 1 for i in range(K) if chunked[i]}
    bounds = sorted(cuts | {K})
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
        if chunked[bounds[s]]:
            adjoint, dw_s = _chunked_step_vjp(start, t0, keys, spec, adams[bounds[s]], batches[bounds[s]], w, adjoint,
                                              chunk_rows)
            dw = dw + dw_s
            continue
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
    recipe: str = "distcur"  # RECIPES
    lr_schedule: str = "constant"  # over the T steps, see distcur.policy.functional.lr_schedule
    warmup_steps: int = 0
    pool_percentiles: tuple[float, float] = (20.0, 80.0)  # datamil recipe: join / leave the pool
    chunk_rows: int | None = None  # datamil recipe: the special batch's rows per chunk (None: all at once)

    def __post_init__(self):
        if not 0 < self.meta_steps <= self.total_steps:
            raise ValueError(f"need 0 < meta_steps <= total_steps, got K={self.meta_steps}, T={self.total_steps}")
        if self.iterations <= 0 or not 0 < self.candidate_fraction < 1:
            raise ValueError(f"need iterations > 0 and 0 < candidate_fraction < 1, got {self}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        lo, hi = self.pool_percentiles
        if not 0 <= lo <= hi <= 100:
            raise ValueError(f"pool_percentiles must be 0 <= low <= high <= 100, got {self.pool_percentiles}")
        lr_schedule(1.0, self.total_steps, self.lr_schedule, self.warmup_steps)  # validates both

    def lrs(self, lr: float) -> np.ndarray:
        """The learning rate of each of the T steps, (T,)."""
        return lr_schedule(lr, self.total_steps, self.lr_schedule, self.warmup_steps)


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


def metagrad_iteration(
    spec: PolicySpec,
    adam: AdamConfig,
    obs: torch.Tensor,
    act: torch.Tensor,
    cluster: np.ndarray,
    n_clusters: int,
    proxy_fn: Callable[[Params], torch.Tensor],
    cfg: MetagradRunConfig,
    it: int,
    candidates: np.ndarray,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """Iteration ``it`` of ``cfg.recipe`` with ``candidates`` (C,) bool (and, for the datamil
    recipe, the training ``pool`` (C,) bool): d proxy / d w, (C,) float64, whose ``candidates``
    entries are the iteration's scores (the datamil recipe's are 0 elsewhere). A pure function of
    its arguments (its init and minibatch seeds come from ``cfg.seed`` and ``it``), so iterations
    can run anywhere, in any order, and give the same numbers.

    distcur: fresh init (seed + it), T - K forward steps on the target rows and the non-candidate
    clusters, then K steps where the candidates join the batches at weight 0. datamil: T - K
    forward steps on the pool from the shared init (seed), then the special batch of every
    candidate row at weight 0 and K - 1 more pool batches, losses summed over rows."""
    if cfg.recipe == "datamil":
        if pool is None:
            raise ValueError("metagrad_iteration: the datamil recipe needs the training pool")
        return _reference_iteration(spec, adam, obs, act, cluster, n_clusters, proxy_fn, cfg, it, pool, candidates)
    ckpt = cfg.checkpoint_every or sqrt_checkpoint_every(cfg.meta_steps)
    n_fwd = cfg.total_steps - cfg.meta_steps
    lrs = cfg.lrs(adam.lr)
    params = init_params(spec, cfg.seed + it, obs.dtype)
    opt = adam_init(params)
    seed = cfg.seed * 1_000_003 + it
    is_candidate = (cluster >= 0) & candidates[np.maximum(cluster, 0)]
    # Forward phase: the target rows and the non-candidate clusters, all at weight 1.
    fwd_rows = np.flatnonzero(~is_candidate)
    if n_fwd and len(fwd_rows):
        fwd_steps = _step_fns(spec, adam, "batch", lrs[:n_fwd], n_fwd)
        fwd_group = np.where(cluster[fwd_rows] < 0, -1, 0)
        idx = fwd_rows[sample_batches(fwd_group, n_fwd, cfg.batch_size, cfg.target_fraction, seed)]
        ones = torch.ones(cfg.batch_size, dtype=obs.dtype)
        with torch.no_grad():
            for step, b in zip(fwd_steps, idx):
                rows = torch.as_tensor(b)
                params, opt, _ = step(params, opt, obs[rows], act[rows], ones)
    # Meta phase: candidates enter at weight 0 with their own cluster ids; the rest weigh 1.
    meta_group = np.where(cluster >= 0, 0, -1)
    idx = sample_batches(meta_group, cfg.meta_steps, cfg.batch_size, cfg.target_fraction, seed + 17)
    group_t = torch.as_tensor(np.where(is_candidate, cluster, -1))
    batches = [(obs[torch.as_tensor(b)], act[torch.as_tensor(b)], group_t[torch.as_tensor(b)]) for b in idx]
    w = torch.ones(n_clusters, dtype=obs.dtype)
    w[torch.as_tensor(candidates)] = 0.0
    _, dw, _ = weight_meta_gradient(params, opt, spec, adam, batches, w, proxy_fn, ckpt, "batch", lrs[n_fwd:])
    return dw.numpy().astype(np.float64)


def candidate_sets(n_clusters: int, cfg: MetagradRunConfig) -> list[np.ndarray]:
    """Every iteration's candidate set under ``cfg.recipe``, (C,) bool each (pure in ``cfg.seed``)."""
    return _candidate_halves(n_clusters, cfg) if cfg.recipe == "distcur" else reference_candidates(n_clusters, cfg)


def combine_distcur(dws: Sequence[np.ndarray], candidate_sets: Sequence[np.ndarray],
                    n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean score (C,), count (C,)) of the distcur recipe from each iteration's d proxy / d w and
    candidate set, summed in iteration order."""
    total = np.zeros(n_clusters)
    count = np.zeros(n_clusters, np.int64)
    for dw, candidates in zip(dws, candidate_sets):
        total[candidates] += dw[candidates]
        count[candidates] += 1
    return np.divide(total, np.maximum(count, 1)), count


def datamil_metagrad_scores(
    spec: PolicySpec,
    adam: AdamConfig,
    obs: torch.Tensor,
    act: torch.Tensor,
    cluster: torch.Tensor,
    n_clusters: int,
    proxy_fn: Callable[[Params], torch.Tensor],
    cfg: MetagradRunConfig,
    on_iteration: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean d proxy / d w_i per cluster, (C,), and how many iterations scored it, (C,).

    The pool is ``obs``/``act`` (N, .) with ``cluster`` (N,) in 0..C-1, and -1 for the injected
    target rows (always weight 1). Per iteration (:func:`distcur_iteration`): fresh init (seed + it),
    T - K forward steps on the target rows and the non-candidate clusters, then K steps where the
    candidates join the batches at weight 0 and the proxy is differentiated with respect to their
    weights. A negative mean (the proxy is a loss) means that up-weighting the cluster helps.
    The iterations are independent: the datamodel stage's Ray Train executor spreads them over Ray
    Train workers. ``on_iteration()`` is called after each iteration (a progress bar's update).
    """
    cluster_np = cluster.numpy()
    candidate_sets = _candidate_halves(n_clusters, cfg)
    dws = []
    for it, candidates in enumerate(candidate_sets):
        dws.append(metagrad_iteration(spec, adam, obs, act, cluster_np, n_clusters, proxy_fn, cfg, it, candidates))
        if on_iteration is not None:
            on_iteration()
    return combine_distcur(dws, candidate_sets, n_clusters)


def update_pool(pool: np.ndarray, scores: np.ndarray,
                percentiles: tuple[float, float] = (20.0, 80.0)) -> np.ndarray:
    """The reference's pool update after one iteration, a new (C,) bool array.

    ``pool`` (C,) bool, ``scores`` (C,) that iteration's meta-gradients (0: not a candidate).
    Of the clusters with a non-zero score, those at or below the low percentile of the non-zero
    scores join the pool, those at or above the high one leave it (joining wins a tie). The
    reference also compares the unscored clusters' 0 with the percentiles, which moves all of them
    when every score has one sign; here a cluster moves only on its own score."""
    if pool.shape != scores.shape or pool.ndim != 1:
        raise ValueError(f"update_pool: pool {pool.shape} and scores {scores.shape} must be the same (C,)")
    scored = scores != 0
    out = pool.copy()
    if not scored.any():
        return out
    lo, hi = np.percentile(scores[scored], percentiles)
    out[scored & (scores >= hi)] = False
    out[scored & (scores <= lo)] = True
    return out


def reference_iteration_batches(
    obs: torch.Tensor,
    act: torch.Tensor,
    cluster: np.ndarray,
    pool: np.ndarray,
    candidates: np.ndarray,
    cfg: MetagradRunConfig,
    seed: int,
) -> tuple[list[np.ndarray], list[Batch]]:
    """One iteration of the reference recipe as batches: (the T - K forward batches' row indices,
    each (B,), and the K differentiated batches). The first differentiated batch (step T - K) is
    the special batch, every row of the ``candidates`` (C,) bool with its cluster id as group;
    the other K - 1 and all forward batches draw B rows from the ``pool`` (C,) bool clusters and
    the injected target rows (cluster -1, ``target_fraction`` of each batch), group -1."""
    in_pool = (cluster < 0) | pool[np.maximum(cluster, 0)]
    rows = np.flatnonzero(in_pool)
    if len(rows) == 0:
        raise ValueError("datamil recipe: the training pool holds no rows")
    group = np.where(cluster[rows] < 0, -1, 0)
    idx = rows[sample_batches(group, cfg.total_steps - 1, cfg.batch_size, cfg.target_fraction, seed)]
    n_fwd = cfg.total_steps - cfg.meta_steps
    special = torch.as_tensor(np.flatnonzero((cluster >= 0) & candidates[np.maximum(cluster, 0)]))
    fixed = torch.full((cfg.batch_size,), -1, dtype=torch.int64)
    meta = [(obs[special], act[special], torch.as_tensor(cluster)[special])]
    meta += [(obs[torch.as_tensor(b)], act[torch.as_tensor(b)], fixed) for b in idx[n_fwd:]]
    return list(idx[:n_fwd]), meta


def reference_candidates(n_clusters: int, cfg: MetagradRunConfig) -> list[np.ndarray]:
    """The reference recipe's candidate set of every iteration, (C,) bool each: drawn in sequence
    from ``cfg.seed``, independent of the pool."""
    rng = np.random.default_rng([cfg.seed, 13])
    n_cand = max(1, int(round(cfg.candidate_fraction * n_clusters)))
    out = []
    for _ in range(cfg.iterations):
        candidates = np.zeros(n_clusters, bool)
        candidates[rng.permutation(n_clusters)[:n_cand]] = True
        out.append(candidates)
    return out


def _reference_iteration(spec: PolicySpec, adam: AdamConfig, obs: torch.Tensor, act: torch.Tensor, cluster: np.ndarray,
                         n_clusters: int, proxy_fn: Callable[[Params], torch.Tensor], cfg: MetagradRunConfig, it: int,
                         pool: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    n_fwd = cfg.total_steps - cfg.meta_steps
    lrs = cfg.lrs(adam.lr)
    fwd_steps = _step_fns(spec, adam, "sum", lrs[:n_fwd], n_fwd)
    ckpt = cfg.checkpoint_every or sqrt_checkpoint_every(cfg.meta_steps)
    fwd, meta = reference_iteration_batches(obs, act, cluster, pool, candidates, cfg, cfg.seed * 1_000_003 + it)
    params = init_params(spec, cfg.seed, obs.dtype)
    opt = adam_init(params)
    ones = torch.ones(cfg.batch_size, dtype=obs.dtype)
    with torch.no_grad():
        for step, b in zip(fwd_steps, fwd):
            rows = torch.as_tensor(b)
            params, opt, _ = step(params, opt, obs[rows], act[rows], ones)
    w = torch.zeros(n_clusters, dtype=obs.dtype)
    _, dw, _ = weight_meta_gradient(params, opt, spec, adam, meta, w, proxy_fn, ckpt, "sum", lrs[n_fwd:],
                                    cfg.chunk_rows)
    return dw.numpy().astype(np.float64)


def round_pools(scores: Sequence[np.ndarray], n_clusters: int, cfg: MetagradRunConfig,
                round_size: int) -> tuple[list[np.ndarray], list[int]]:
    """Rounds of the reference recipe: iteration i is in round i // round_size and trains on the
    pool left by every iteration of the earlier rounds, their :func:`update_pool` applied in
    iteration order. ``scores``: the meta-gradients of iterations 0..n-1 computed so far.
    Returns (the pool of each iteration 0..min(n_done_rounds * R + R, iterations) - 1 that the
    given scores determine, the pool size after each given iteration's update). With
    ``round_size`` 1 this is the reference's sequence; with R the R iterations of a round are
    independent of each other and can run in parallel."""
    if round_size < 1:
        raise ValueError(f"round_size must be >= 1, got {round_size}")
    pool = np.ones(n_clusters, bool)
    pools: list[np.ndarray] = []
    sizes: list[int] = []
    for lo in range(0, cfg.iterations, round_size):
        hi = min(lo + round_size, cfg.iterations)
        pools += [pool.copy() for _ in range(lo, hi)]
        if len(scores) < hi:
            break
        for i in range(lo, hi):
            pool = update_pool(pool, scores[i], cfg.pool_percentiles)
            sizes.append(int(pool.sum()))
    return pools, sizes


def combine_reference(scores: Sequence[np.ndarray], n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(the mean of each cluster's non-zero meta-gradients, 0 if none, (C,); their count, (C,))."""
    total = np.zeros(n_clusters)
    count = np.zeros(n_clusters, np.int64)
    for s in scores:
        nz = s != 0
        total[nz] += s[nz]
        count[nz] += 1
    return np.divide(total, np.maximum(count, 1)), count


def datamil_reference_scores(
    spec: PolicySpec,
    adam: AdamConfig,
    obs: torch.Tensor,
    act: torch.Tensor,
    cluster: torch.Tensor,
    n_clusters: int,
    proxy_fn: Callable[[Params], torch.Tensor],
    cfg: MetagradRunConfig,
    on_iteration: Callable[[], None] | None = None,
    round_size: int = 1,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The reference recipe (module docstring): (score (C,), the mean of each cluster's non-zero
    meta-gradients, 0 if none; count (C,), how many there were; the pool size after each iteration).

    ``obs``/``act`` (N, .) with ``cluster`` (N,) in 0..C-1, -1 for injected target rows (always in
    the pool). Each iteration starts from the same initialisation (``cfg.seed``), as the
    reference's, and draws ``candidate_fraction`` of all clusters (in the pool or not) as its
    candidates. ``round_size`` R: the pool moves once per round of R iterations (see
    :func:`round_pools`; 1, the default, is the reference's sequence); the Ray Train executor runs
    a round's iterations in parallel and gives these numbers. Memory: the special batch's graph
    holds ``cfg.chunk_rows`` rows at a time (None: every candidate row at once).
    ``on_iteration()`` is called after each iteration.
    """
    cluster_np = cluster.numpy()
    candidate_sets = reference_candidates(n_clusters, cfg)
    scores: list[np.ndarray] = []
    for it in range(cfg.iterations):
        pool = round_pools(scores, n_clusters, cfg, round_size)[0][it]
        scores.append(metagrad_iteration(spec, adam, obs, act, cluster_np, n_clusters, proxy_fn, cfg, it,
                                         candidate_sets[it], pool))
        if on_iteration is not None:
            on_iteration()
    score, count = combine_reference(scores, n_clusters)
    return score, count, round_pools(scores, n_clusters, cfg, round_size)[1]


def bits_fingerprint(x: np.ndarray) -> str:
    """A short hash of a bool vector (a candidate set, a training pool)."""
    return hashlib.sha256(np.packbits(np.asarray(x, bool)).tobytes()).hexdigest()[:16]


def data_fingerprint(data: SubsetTrainingData) -> str:
    """sha256 of the training and proxy arrays (what the cluster level, horizon, injection and
    normalisation made of the inputs)."""
    h = hashlib.sha256()
    for a in (data.obs, data.act, data.group, data.proxy_obs, data.proxy_act):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(str(data.n_clusters).encode())
    return h.hexdigest()[:16]


@dataclass
class MetagradFold:
    """One fold's meta-gradient iterations: its arrays, policy, optimiser and run config."""

    fold: int
    data: SubsetTrainingData
    spec: PolicySpec
    adam: AdamConfig
    run_cfg: MetagradRunConfig
    proxy: str
    round_size: int = 1  # datamil recipe: iterations per round (distcur: every iteration is one round)

    def rounds(self) -> list[range]:
        n = self.run_cfg.iterations
        size = n if self.run_cfg.recipe == "distcur" else self.round_size
        return [range(lo, min(lo + size, n)) for lo in range(0, n, size)]

    def iteration_config(self, it: int, candidates: np.ndarray, pool: np.ndarray | None, data_fp: str) -> dict:
        return {"fold": self.fold, "iteration": it, "run": dataclasses.asdict(self.run_cfg),
                "spec": {"hidden": list(self.spec.hidden), "state_dim": self.spec.state_dim,
                         "action_dim": self.spec.action_dim},
                "adam": dataclasses.asdict(self.adam), "proxy": self.proxy, "round_size": self.round_size,
                "candidates": bits_fingerprint(candidates),
                "pool": None if pool is None else bits_fingerprint(pool), "data": data_fp}
