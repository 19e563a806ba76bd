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

import math
from collections.abc import Sequence

import numpy as np
import torch

from distcur.policy.functional import (
    ACTION_EPS,
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


def _blocks(spec: PolicySpec) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter blocks of one model's row of a flat buffer, in order: the first layer's
    weight and bias as one (H, ds + 1) matrix [w | b] (its inputs carry a column of ones, so
    its bias is part of its GEMMs: K = 40 ran faster than K = 39 plus a bias pass), the other
    hidden layers' weight and bias, then both heads' weights as one (2 da, H) matrix (mean
    rows first) and their biases, so the two heads are one GEMM."""
    h, ds, da = spec.hidden, spec.state_dim, spec.action_dim
    blocks: list[tuple[str, tuple[int, ...]]] = [("h0.wb", (h[0], ds + 1))]
    for i in range(1, len(h)):
        blocks += [(f"h{i}.w", (h[i], h[i - 1])), (f"h{i}.b", (h[i],))]
    return [*blocks, ("head.w", (2 * da, h[-1])), ("head.b", (2 * da,))]


class _FlatStack:
    """k models' parameters (or gradients, or Adam moments) in one (k, P) buffer, one model per
    row (blocks of :func:`_blocks`), with a (k, ...) view per block and per parameter name of
    :func:`~distcur.policy.functional.init_params`. A range of models is a contiguous block
    of rows, so the optimiser updates it in one pass."""

    def __init__(self, spec: PolicySpec, flat: torch.Tensor):
        self.flat = flat
        k, off, v = flat.shape[0], 0, {}
        for name, shape in _blocks(spec):
            size = math.prod(shape)
            v[name] = flat[:, off : off + size].view(k, *shape)
            off += size
        ds, da = spec.state_dim, spec.action_dim
        v["h0.w"], v["h0.b"] = v["h0.wb"][..., :ds], v["h0.wb"][..., ds]
        for j, head in enumerate(("mean", "log_std")):
            v[f"{head}.w"], v[f"{head}.b"] = v["head.w"][:, j * da : (j + 1) * da], v["head.b"][:, j * da : (j + 1) * da]
        self.views = v
        self.names = [f"{name}.{p}" for name, _, _ in spec.layer_sizes() for p in ("w", "b")]

    @classmethod
    def pack(cls, spec: PolicySpec, tensors: Params) -> _FlatStack:
        size = sum(math.prod(shape) for _, shape in _blocks(spec))
        ref = tensors["h0.w"]
        out = cls(spec, torch.empty(ref.shape[0], size, dtype=ref.dtype))
        if set(tensors) != set(out.names):
            raise ValueError(f"stacked parameters: expected {sorted(out.names)}, got {sorted(tensors)}")
        for name in out.names:
            out.views[name].copy_(tensors[name])
        return out

    def unpack(self) -> Params:
        return {n: self.views[n].clone() for n in self.names}


class _Workspace:
    """The activation and gradient buffers of one chunk of up to ``n`` models, allocated once
    per training call and reused by every step (fresh (n, B, H) buffers each step were
    page-faulted back in, zeroed, by the allocator: the elementwise ops ran 10x slower)."""

    def __init__(self, spec: PolicySpec, n: int, batch_size: int, dtype: torch.dtype):
        self.h = [torch.empty(n, batch_size, h, dtype=dtype) for h in spec.hidden]
        self.dh = [torch.empty(n, batch_size, h, dtype=dtype) for h in spec.hidden]
        self.out = torch.empty(n, batch_size, 2 * spec.action_dim, dtype=dtype)
        self.g = torch.empty_like(self.out)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _Chunk:
    """The views one chunk of models ``s`` works on, made once per training call: its rows of
    the parameter and gradient buffers per block (weights also transposed, as the forward's
    GEMMs read them) and its slices of the workspace buffers."""

    def __init__(self, P: _FlatStack, G: _FlatStack, s: slice, ws: _Workspace, spec: PolicySpec):
        self.s, self.n = s, s.stop - s.start
        self.p = {name: v[s] for name, v in P.views.items()}
        self.pT = {name: v.transpose(1, 2) for name, v in self.p.items() if v.dim() == 3}
        self.bias = {name: v.unsqueeze(1) for name, v in self.p.items() if v.dim() == 2}
        self.g = {name: v[s] for name, v in G.views.items()}
        self.h = [b[: self.n] for b in ws.h]
        self.dh = [b[: self.n] for b in ws.dh]
        self.out, self.gout = ws.out[: self.n], ws.g[: self.n]


def _chunk_step(c: _Chunk, spec: PolicySpec, obs1: torch.Tensor, u: torch.Tensor, log_det: torch.Tensor,
                coef: torch.Tensor) -> torch.Tensor:
    """Forward and hand-written backward of the chunk's models on one batch, gradients written
    into the gradient buffer; returns their losses (n,) = sum over the batch of ``coef`` x NLL.

    ``obs1`` (B, ds + 1) is the batch's states with a column of ones (shared: broadcast, not
    copied, into the first layer's batched GEMM), ``u`` = atanh(clipped actions) and
    ``log_det`` = log(1 - a^2 + eps) (B, da) are the parameter-free terms of
    :func:`~distcur.policy.functional.tanh_gaussian_nll`, and ``coef`` (n, B) is d loss / d NLL.
    Every (n, B, H) tensor is a workspace buffer written in place: per layer one batched GEMM
    forward (bias in it, or broadcast into its output) and an in-place ReLU; backward one
    in-place ReLU mask, one GEMM for the weight gradient (with the bias's, for the first
    layer), one reduction for the bias gradient and one GEMM for the input gradient. The
    loss head works on (n, B, 2 da).
    """
    p, pT, bias, g = c.p, c.pT, c.bias, c.g
    da, L = spec.action_dim, len(spec.hidden)
    x0 = obs1.expand(c.n, *obs1.shape)
    xs = [torch.bmm(x0, pT["h0.wb"], out=c.h[0]).clamp_min_(0)]
    for i in range(1, L):
        xs.append(torch.baddbmm(bias[f"h{i}.b"], xs[-1], pT[f"h{i}.w"], out=c.h[i]).clamp_min_(0))
    out = torch.baddbmm(bias["head.b"], xs[-1], pT["head.w"], out=c.out)
    mean, log_std_raw = out[..., :da], out[..., da:]
    log_std = torch.clamp(log_std_raw, spec.log_std_min, spec.log_std_max)
    inv_std = torch.exp(-log_std)
    z = (u - mean) * inv_std
    w = coef.unsqueeze(-1)
    loss = ((0.5 * z * z + log_std + _HALF_LOG_2PI + log_det) * w).sum((1, 2))  # tanh_gaussian_nll, weighted
    gout = c.gout  # d loss / d out
    torch.mul(z * inv_std, w, out=gout[..., :da]).neg_()
    torch.mul((1 - z * z) * w, log_std == log_std_raw, out=gout[..., da:])  # clamp passes the gradient inside [min, max]
    torch.bmm(gout.transpose(1, 2), xs[-1], out=g["head.w"])
    torch.sum(gout, 1, out=g["head.b"])
    dh = torch.bmm(gout, p["head.w"], out=c.dh[L - 1])
    for i in reversed(range(L)):
        torch.ops.aten.threshold_backward.grad_input(dh, xs[i], 0.0, grad_input=dh)  # ReLU backward
        if i == 0:
            torch.bmm(dh.transpose(1, 2), x0, out=g["h0.wb"])
            break
        torch.bmm(dh.transpose(1, 2), xs[i - 1], out=g[f"h{i}.w"])
        torch.sum(dh, 1, out=g[f"h{i}.b"])
        dh = torch.bmm(dh, p[f"h{i}.w"], out=c.dh[i - 1])
    return loss


def _chunk_optimisers(P: _FlatStack, G: _FlatStack, M: _FlatStack, V: _FlatStack, t: torch.Tensor,
                      chunks: list[slice], adam: AdamConfig) -> list[torch.optim.Adam]:
    """One fused Adam (``torch.optim.Adam(fused=True)``: one pass over parameters, gradients
    and both moments) per chunk of models, over the chunk's rows of the flat buffers, with the
    given moments and per-model step counts ``t`` (models whose counts differ are separate
    parameters of it)."""
    opts = []
    for s in chunks:
        runs, start = [], s.start
        for i in range(s.start + 1, s.stop + 1):
            if i == s.stop or t[i] != t[start]:
                runs.append(slice(start, i))
                start = i
        params = [P.flat[r] for r in runs]
        opt = torch.optim.Adam(params, lr=adam.lr, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                               weight_decay=adam.weight_decay, fused=True)
        for p, r in zip(params, runs):
            p.grad = G.flat[r]
            opt.state[p] = {"step": torch.tensor(float(t[r.start]), dtype=torch.float32),
                            "exp_avg": M.flat[r], "exp_avg_sq": V.flat[r]}
        opts.append(opt)
    return opts


def default_chunk(spec: PolicySpec, batch_size: int, k: int, budget_bytes: int = 16 << 20) -> int:
    """Models per forward/backward pass: as many as keep one step's activation and gradient
    buffers (2 x B x sum(hidden) floats per model) within ``budget_bytes``, so they stay in
    the cache between the ops that write and read them (at least 1, at most k)."""
    per_model = 2 * batch_size * sum(spec.hidden) * 4
    return int(max(1, min(k, budget_bytes // per_model)))


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
    chunk: int | None = None,
) -> tuple[Params, dict, torch.Tensor]:
    """Train k stacked models for ``len(batches)`` Adam steps; returns (params, opt_state, losses (steps, k)).

    With ``normalize="weights"`` each model's loss is the mean over the rows it keeps, so a
    model sees exactly its subset (plus the injected rows). The inputs are not modified.

    The models share no parameter, so each one's gradient is that of its own loss; they are
    trained ``chunk`` at a time within a step (default :func:`default_chunk`: buffers that stay
    in the cache), each chunk by :func:`_chunk_step` (per layer three batched GEMMs over the
    chunk, a few in-place elementwise passes on reused buffers) and a fused Adam over the
    chunk's rows of one flat parameter buffer. Equal, to float rounding, to differentiating
    the summed loss of :func:`stacked_forward` with autograd and stepping Adam
    (:func:`~distcur.policy.functional.adam_update`) on each model, which is what
    :func:`train_single` does one model at a time.
    """
    k = next(iter(params.values())).shape[0]
    if masks.shape[0] != k:
        raise ValueError(f"train_ensemble: masks has {masks.shape[0]} rows for {k} stacked models")
    if int(group.max()) >= masks.shape[1]:
        raise ValueError(f"train_ensemble: group ids reach {int(group.max())} but masks has {masks.shape[1]} columns")
    if normalize not in ("weights", "batch"):
        raise ValueError(f"normalize must be 'weights' or 'batch', got {normalize!r}")
    batches = np.asarray(batches, dtype=np.int64)
    if batches.ndim != 2:
        raise ValueError(f"train_ensemble: batches must be (steps, batch_size) row indices, got shape {batches.shape}")
    steps, batch_size = batches.shape
    chunk = default_chunk(spec, batch_size, k) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"train_ensemble: chunk must be >= 1, got {chunk}")
    keep_freed_memory()
    dtype = params["h0.w"].dtype
    masks = masks.to(dtype)
    P = _FlatStack.pack(spec, params)
    M, V = _FlatStack.pack(spec, opt_state["m"]), _FlatStack.pack(spec, opt_state["v"])
    G = _FlatStack(spec, torch.empty_like(P.flat))
    t = opt_state["t"].to(torch.float64).clone()
    chunks = [slice(i, min(i + chunk, k)) for i in range(0, k, chunk)]
    opts = _chunk_optimisers(P, G, M, V, t, chunks, adam)
    ws = _Workspace(spec, min(chunk, k), batch_size, dtype)
    views = [_Chunk(P, G, s, ws, spec) for s in chunks]
    obs1 = torch.ones(batch_size, obs.shape[1] + 1, dtype=obs.dtype)  # states and a column of ones
    losses = torch.empty(steps, k, dtype=dtype)
    for step, idx in enumerate(batches):
        rows = torch.as_tensor(idx)
        obs1[:, :-1] = obs[rows]
        w = batch_weights(masks, group[rows])
        coef = w / (w.sum(1, keepdim=True).clamp_min(1e-12) if normalize == "weights" else batch_size)
        a = torch.clamp(act[rows], -1 + ACTION_EPS, 1 - ACTION_EPS)  # the terms of tanh_gaussian_nll
        u, log_det = torch.atanh(a), torch.log1p(-(a**2) + ACTION_EPS)  # that hold no parameter
        with torch.no_grad():
            for c, opt in zip(views, opts):
                losses[step, c.s] = _chunk_step(c, spec, obs1, u, log_det, coef[c.s])
                opt.step()
    t += steps
    out_state = {"m": M.unpack(), "v": V.unpack(), "t": t}
    return P.unpack(), out_state, losses


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
