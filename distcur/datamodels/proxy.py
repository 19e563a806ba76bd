"""DataMIL's proxy metric and target injection.

The target demonstrations are split in half by episode: one half (``inject``) is mixed into
every training run of the estimation, the other (``proxy``) defines the proxy metric, a loss
of the trained policy on it. Lower is better; a datamodel scores a cluster by how much
including it lowers this loss. Two proxies:

* ``nll``: the BC loss itself, the tanh-Gaussian NLL. Heavy-tailed where the target's actions
  saturate at +-1 (atanh of the clipped action is large): a policy trained on noisier data has
  a larger predicted std and so a lower NLL there, whatever its mean action, so this proxy
  rewards noisy data (on pick-place-wall-v3 the meta-gradient picked 18 failed rollouts of 19);
* ``mse``: the squared error of the action the policy executes, tanh(mean), against the
  target's action; bounded, blind to the predicted std, and what a rollout depends on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distcur.data import StepArrays
from distcur.policy.functional import Params, PolicySpec, bc_loss, policy_forward

PROXIES = ("nll", "mse")


@dataclass
class TargetSplit:
    inject: StepArrays
    proxy: StepArrays


def split_target(target: StepArrays, seed: int = 0) -> TargetSplit:
    """Split the target episodes at random into two halves (the injected half gets the extra
    episode when the count is odd). Needs at least 2 target episodes."""
    ep = target.episode_ids()
    n_ep = int(ep.max()) + 1 if len(ep) else 0
    if n_ep < 2:
        raise ValueError(f"the target needs at least 2 episodes to split into inject/proxy halves, got {n_ep}")
    order = np.random.default_rng([int(seed), 11]).permutation(n_ep)
    inject_eps = order[: (n_ep + 1) // 2]
    in_inject = np.isin(ep, inject_eps)
    return TargetSplit(inject=target.take(np.flatnonzero(in_inject)), proxy=target.take(np.flatnonzero(~in_inject)))


def check_proxy(kind: str) -> str:
    if kind not in PROXIES:
        raise ValueError(f"proxy must be one of {PROXIES}, got {kind!r}")
    return kind


def proxy_loss(params: Params, spec: PolicySpec, obs: torch.Tensor, act: torch.Tensor,
               kind: str = "nll") -> torch.Tensor:
    """The proxy of ``params`` on the proxy half (scalar, differentiable): the mean BC loss
    (``nll``) or the mean squared error of tanh(mean) summed over action dims (``mse``)."""
    if check_proxy(kind) == "nll":
        return bc_loss(params, obs, act, spec)
    mean, _ = policy_forward(params, obs, spec)
    return ((torch.tanh(mean) - act) ** 2).sum(-1).mean()


def make_proxy_fn(spec: PolicySpec, obs: torch.Tensor, act: torch.Tensor, kind: str = "nll"):
    """``params -> proxy loss`` closed over the proxy half, for :func:`weight_meta_gradient`."""
    check_proxy(kind)

    def proxy_fn(params: Params) -> torch.Tensor:
        return proxy_loss(params, spec, obs, act, kind)

    return proxy_fn
