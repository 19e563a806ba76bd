"""The proxy metric: a policy's loss on held-out target demonstrations, of a named kind.

DataMIL scores data by its effect on this number instead of on rollouts; the demo reports it beside
rollout success. Lower is better. Two kinds (every report names the one it shows):

* ``nll``: the BC loss itself, the tanh-Gaussian NLL (nats per step, summed over action dims).
  Heavy-tailed where the target's actions saturate at +-1 (atanh of the clipped action is large):
  a policy trained on noisier data has a larger predicted std and so a lower NLL there, whatever
  its mean action, so this proxy rewards noisy data (on pick-place-wall-v3 DataMIL's meta-gradient
  picked 18 failed rollouts of 19 under it);
* ``mse``: the squared error of the action the policy executes, tanh(mean), against the target's
  action, summed over action dims; bounded, blind to the predicted std, and what a rollout depends on.

:func:`proxy_loss` is the one definition (torch, differentiable, normalised units);
:func:`policy_proxy` applies it to a trained policy on raw states and actions.
"""

from __future__ import annotations

import numpy as np
import torch

from distcur.policy.functional import Params, PolicySpec, bc_loss, policy_forward
from distcur.policy.loaded import TrainedPolicy

PROXIES = ("nll", "mse")


def check_proxy(kind: str) -> str:
    if kind not in PROXIES:
        raise ValueError(f"proxy must be one of {PROXIES}, got {kind!r}")
    return kind


def proxy_loss(params: Params, spec: PolicySpec, obs: torch.Tensor, act: torch.Tensor,
               kind: str = "nll") -> torch.Tensor:
    """The proxy of ``params`` on (obs, act) in the policy's normalised units (scalar,
    differentiable): the mean BC loss (``nll``) or the mean squared error of tanh(mean) (``mse``)."""
    if check_proxy(kind) == "nll":
        return bc_loss(params, obs, act, spec)
    mean, _ = policy_forward(params, obs, spec)
    return ((torch.tanh(mean) - act) ** 2).sum(-1).mean()


def make_proxy_fn(spec: PolicySpec, obs: torch.Tensor, act: torch.Tensor, kind: str = "nll"):
    """``params -> proxy loss`` closed over (obs, act), for the meta-gradients."""
    check_proxy(kind)

    def proxy_fn(params: Params) -> torch.Tensor:
        return proxy_loss(params, spec, obs, act, kind)

    return proxy_fn


def policy_proxy(policy: TrainedPolicy, states: np.ndarray, actions: np.ndarray, kind: str = "nll",
                 batch_size: int = 65536) -> float:
    """The ``kind`` proxy of a trained policy on ``actions`` (N, action_dim) given ``states``
    (N, state_dim), in raw units of the target's action space (normalised by the policy's own
    :class:`Normalizer`, after its per-source action standardisation if it was trained with one)."""
    check_proxy(kind)
    states, actions = np.asarray(states, np.float32), np.asarray(actions, np.float32)
    if states.ndim != 2 or actions.ndim != 2 or len(states) != len(actions) or len(states) == 0:
        raise ValueError(f"proxy: expected (N, ds) states and (N, da) actions with N > 0, got "
                         f"{states.shape} and {actions.shape}")
    if states.shape[1] != policy.spec.state_dim or actions.shape[1] != policy.spec.action_dim:
        raise ValueError(f"proxy: data dims {states.shape[1]}/{actions.shape[1]} do not match the policy's "
                         f"{policy.spec.state_dim}/{policy.spec.action_dim}")
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(states), batch_size):
            obs = torch.from_numpy(policy.normalizer.state(states[start : start + batch_size]))
            raw = policy.training_actions(actions[start : start + batch_size])  # per-source standardised
            act = torch.from_numpy(policy.normalizer.action(raw))
            total += float(proxy_loss(policy.params, policy.spec, obs, act, kind)) * len(obs)
    return total / len(states)
