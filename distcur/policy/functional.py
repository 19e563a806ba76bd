"""The functional core of distcur's policy: parameters and optimiser state are explicit.

DataMIL's MetaWorld policy: an MLP (3 x 400 ReLU by default) with a mean head and a log-std
head, trained by the negative log-likelihood of a tanh-squashed Gaussian. Everything here is a
pure function of tensors, so that

* ``torch.func.vmap`` trains many models at once (stacked parameters, per-model sample
  weights): the regression datamodels of DataMIL;
* ``torch.autograd`` differentiates a whole run of Adam steps with respect to the per-sample
  weights: DataMIL's meta-gradient estimator and meta-gradient rebalancing.

Shapes: ``obs`` (B, state_dim) normalised states, ``act`` (B, action_dim) actions in (-1, 1)
(see :class:`Normalizer`), ``weights`` (B,) non-negative.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Params = dict[str, torch.Tensor]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
ACTION_EPS = 1e-6


@dataclass(frozen=True)
class PolicySpec:
    """Architecture of the MLP policy."""

    state_dim: int
    action_dim: int
    hidden: tuple[int, ...] = (400, 400, 400)
    log_std_min: float = LOG_STD_MIN
    log_std_max: float = LOG_STD_MAX

    def __post_init__(self):
        if self.state_dim <= 0 or self.action_dim <= 0:
            raise ValueError(f"PolicySpec: state_dim and action_dim must be positive, got {self}")
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(f"PolicySpec: hidden must be a non-empty tuple of positive sizes, got {self.hidden}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    def layer_sizes(self) -> list[tuple[str, int, int]]:
        dims = [self.state_dim, *self.hidden]
        layers = [(f"h{i}", dims[i], dims[i + 1]) for i in range(len(self.hidden))]
        return [*layers, ("mean", dims[-1], self.action_dim), ("log_std", dims[-1], self.action_dim)]

    def flops_per_sample(self) -> int:
        """Multiply-adds x 2 of one forward pass (the backward pass costs about twice that)."""
        return 2 * sum(i * o for _, i, o in self.layer_sizes())


def init_params(spec: PolicySpec, seed: int = 0, dtype: torch.dtype = torch.float32) -> Params:
    """PyTorch ``nn.Linear`` default initialisation, deterministic for ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    params: Params = {}
    for name, fan_in, fan_out in spec.layer_sizes():
        bound = 1.0 / math.sqrt(fan_in)
        params[f"{name}.w"] = (torch.rand(fan_out, fan_in, generator=g, dtype=dtype) * 2 - 1) * bound
        params[f"{name}.b"] = (torch.rand(fan_out, generator=g, dtype=dtype) * 2 - 1) * bound
    return params


def stack_params(params_list: list[Params]) -> Params:
    """k parameter dicts -> one dict of tensors with a leading model axis (for vmap)."""
    return {k: torch.stack([p[k] for p in params_list]) for k in params_list[0]}


def unstack_params(params: Params) -> list[Params]:
    k = next(iter(params.values())).shape[0]
    return [{n: t[i] for n, t in params.items()} for i in range(k)]


def policy_forward(params: Params, obs: torch.Tensor, spec: PolicySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log_std) of the pre-tanh Gaussian, each (B, action_dim); log_std clipped."""
    x = obs
    for i in range(len(spec.hidden)):
        x = torch.relu(x @ params[f"h{i}.w"].T + params[f"h{i}.b"])
    mean = x @ params["mean.w"].T + params["mean.b"]
    log_std = x @ params["log_std.w"].T + params["log_std.b"]
    return mean, torch.clamp(log_std, spec.log_std_min, spec.log_std_max)


def tanh_gaussian_nll(mean: torch.Tensor, log_std: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Per-sample NLL (B,) of ``act`` under tanh(N(mean, exp(log_std)^2)), summed over dims.

    a = tanh(u): log p(a) = log N(u) - sum log(1 - a^2); the actions are clipped to
    (-1 + eps, 1 - eps) so atanh stays finite.
    """
    a = torch.clamp(act, -1 + ACTION_EPS, 1 - ACTION_EPS)
    u = torch.atanh(a)
    z = (u - mean) * torch.exp(-log_std)
    log_normal = -0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = torch.log1p(-(a**2) + ACTION_EPS)
    return -(log_normal - log_det).sum(-1)


def bc_loss(
    params: Params,
    obs: torch.Tensor,
    act: torch.Tensor,
    spec: PolicySpec,
    weights: torch.Tensor | None = None,
    normalize: str = "weights",
) -> torch.Tensor:
    """Weighted mean NLL over the batch.

    ``normalize="weights"`` divides by the sum of the weights, so samples of weight 0 are
    exactly dropped; ``"batch"`` divides by the batch size (the loss is then linear in each
    weight, which is what a meta-gradient d loss / d w_i at w = 1 differentiates); ``"sum"``
    does not divide (DataMIL's reference training loss: each sample weighs the same in a normal
    batch and in its special batch of all candidate rows, whatever the batch sizes).
    """
    mean, log_std = policy_forward(params, obs, spec)
    nll = tanh_gaussian_nll(mean, log_std, act)
    if weights is None:
        return nll.mean()
    if normalize == "weights":
        return (weights * nll).sum() / weights.sum().clamp_min(1e-12)
    if normalize == "batch":
        return (weights * nll).mean()
    if normalize == "sum":
        return (weights * nll).sum()
    raise ValueError(f"normalize must be 'weights', 'batch' or 'sum', got {normalize!r}")


@dataclass(frozen=True)
class AdamConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_schedule(lr: float, steps: int, kind: str = "constant", warmup_steps: int = 0) -> np.ndarray:
    """Learning rate of each of ``steps`` Adam steps, (steps,): linear warmup from lr / warmup to
    ``lr`` over the first ``warmup_steps``, then constant, or a linear or cosine decay to 0 at
    ``steps``. DataMIL's reference (optax's linear one-cycle) warms up over T / 25 steps and
    decays linearly."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {kind!r}")
    if not 0 <= warmup_steps < max(steps, 1):
        raise ValueError(f"warmup_steps must be in [0, steps={steps}), got {warmup_steps}")
    t = np.arange(steps, dtype=np.float64)
    frac = np.clip((t - warmup_steps) / max(1, steps - warmup_steps), 0.0, 1.0)
    decay = {"constant": np.ones_like(frac), "linear": 1 - frac,
             "cosine": 0.5 * (1 + np.cos(np.pi * frac))}[kind]
    warm = np.minimum(1.0, (t + 1) / warmup_steps) if warmup_steps else np.ones_like(t)
    return lr * warm * decay


def adam_init(params: Params) -> dict[str, Params | torch.Tensor]:
    """Adam state: first and second moments (zeros like params) and the step count."""
    return {
        "m": {k: torch.zeros_like(v) for k, v in params.items()},
        "v": {k: torch.zeros_like(v) for k, v in params.items()},
        "t": torch.zeros((), dtype=torch.float64),
    }


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not inf) at 0, so reverse mode through Adam stays finite where a
    parameter's gradient has always been exactly 0 (a dead ReLU unit). Same values as sqrt."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def adam_update(params: Params, grads: Params, state: dict, cfg: AdamConfig) -> tuple[Params, dict]:
    """One Adam step written without in-place ops (differentiable, vmap-able)."""
    t = state["t"] + 1
    bc1 = 1 - cfg.beta1 ** t.to(torch.float64)
    bc2 = 1 - cfg.beta2 ** t.to(torch.float64)
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        if cfg.weight_decay:
            g = g + cfg.weight_decay * p
        m = cfg.beta1 * state["m"][k] + (1 - cfg.beta1) * g
        v = cfg.beta2 * state["v"][k] + (1 - cfg.beta2) * g * g
        m_hat = m / bc1.to(p.dtype)
        v_hat = v / bc2.to(p.dtype)
        new_p[k] = p - cfg.lr * m_hat / (_safe_sqrt(v_hat) + cfg.eps)
        new_m[k], new_v[k] = m, v
    return new_p, {"m": new_m, "v": new_v, "t": t}


def make_train_step(spec: PolicySpec, adam: AdamConfig, normalize: str = "weights", functional: bool = True) -> Callable:
    """``step(params, opt_state, obs, act, weights) -> (params, opt_state, loss)``.

    ``functional=True``: a pure function built on ``torch.func.grad``; wrap it in
    ``torch.func.vmap`` to train stacked models, or call it on tensors that require grad to
    differentiate through training. ``functional=False``: the same loss and the same Adam
    update with plain ``torch.autograd.grad`` and no graph kept across steps; several times
    cheaper per step in eager mode for one model, which is what single-policy loops want.
    """

    def loss_fn(p, obs, act, w):
        return bc_loss(p, obs, act, spec, w, normalize)

    if not functional:

        def eager_step(params: Params, opt_state: dict, obs, act, weights):
            p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            loss = loss_fn(p, obs, act, weights)
            grads = torch.autograd.grad(loss, list(p.values()))
            with torch.no_grad():
                new_params, opt_state = adam_update(p, dict(zip(p, grads)), opt_state, adam)
            return new_params, opt_state, loss.detach()

        return eager_step

    grad_and_loss = torch.func.grad_and_value(loss_fn)

    def step(params: Params, opt_state: dict, obs, act, weights):
        grads, loss = grad_and_loss(params, obs, act, weights)
        params, opt_state = adam_update(params, grads, opt_state, adam)
        return params, opt_state, loss

    return step


@dataclass
class Normalizer:
    """State standardisation and action scaling to (-1, 1), from the training data.

    States: (s - mean) / std (std floored). Actions: affine map of [low, high] per dim onto
    [-1, 1]; MetaWorld's actions already live in [-1, 1] so the map is the identity there.
    """

    state_mean: np.ndarray
    state_std: np.ndarray
    action_low: np.ndarray
    action_high: np.ndarray

    @classmethod
    def fit(cls, states: np.ndarray, actions: np.ndarray, action_bounds: tuple[float, float] | None = (-1.0, 1.0)):
        """Statistics of ``states`` (N, ds) and ``actions`` (N, da).

        ``action_bounds`` fixes the action range (MetaWorld: [-1, 1]); None uses the data's
        min/max, widened so no training action sits on the tanh boundary.
        """
        states = np.asarray(states, np.float64)
        actions = np.asarray(actions, np.float64)
        if states.ndim != 2 or actions.ndim != 2 or len(states) != len(actions) or len(states) == 0:
            raise ValueError(f"Normalizer.fit: expected (N, ds) and (N, da) with N > 0, got {states.shape}, {actions.shape}")
        if action_bounds is None:
            lo, hi = actions.min(0), actions.max(0)
            pad = np.maximum((hi - lo) * 0.05, 1e-3)
            lo, hi = lo - pad, hi + pad
        else:
            lo = np.full(actions.shape[1], action_bounds[0])
            hi = np.full(actions.shape[1], action_bounds[1])
        return cls(
            state_mean=states.mean(0).astype(np.float32),
            state_std=np.maximum(states.std(0), 1e-3).astype(np.float32),
            action_low=lo.astype(np.float32),
            action_high=hi.astype(np.float32),
        )

    def state(self, s: np.ndarray | torch.Tensor):
        if isinstance(s, torch.Tensor):
            return (s - torch.as_tensor(self.state_mean, dtype=s.dtype)) / torch.as_tensor(self.state_std, dtype=s.dtype)
        return ((np.asarray(s, np.float32) - self.state_mean) / self.state_std).astype(np.float32)

    def action(self, a: np.ndarray) -> np.ndarray:
        """Raw actions -> (-1, 1)."""
        scaled = 2 * (np.asarray(a, np.float32) - self.action_low) / (self.action_high - self.action_low) - 1
        return np.clip(scaled, -1 + ACTION_EPS, 1 - ACTION_EPS).astype(np.float32)

    def unaction(self, a_norm: np.ndarray) -> np.ndarray:
        """(-1, 1) -> raw actions."""
        return (np.asarray(a_norm) + 1) / 2 * (self.action_high - self.action_low) + self.action_low

    def to_dict(self) -> dict[str, list[float]]:
        return {k: np.asarray(v).tolist() for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(**{k: np.asarray(v, np.float32) for k, v in d.items()})


def act_deterministic(params: Params, spec: PolicySpec, norm: Normalizer, states: np.ndarray) -> np.ndarray:
    """Batched greedy action tanh(mean) in the raw action space, (B, action_dim)."""
    with torch.no_grad():
        obs = torch.as_tensor(norm.state(states))
        mean, _ = policy_forward(params, obs, spec)
        return norm.unaction(torch.tanh(mean).numpy())
