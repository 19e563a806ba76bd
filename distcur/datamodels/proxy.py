"""DataMIL's proxy metric and target injection.

The target demonstrations are split in half by episode: one half (``inject``) is mixed into
every training run of the estimation, the other (``proxy``) defines the proxy metric, the BC
loss (tanh-Gaussian NLL) of a trained policy on it. Lower is better; a datamodel scores a
cluster by how much including it lowers this loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distcur.data import StepArrays
from distcur.policy.functional import Params, PolicySpec, bc_loss


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


def proxy_loss(params: Params, spec: PolicySpec, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """The proxy: mean BC loss of ``params`` on the proxy half (scalar, differentiable)."""
    return bc_loss(params, obs, act, spec)


def make_proxy_fn(spec: PolicySpec, obs: torch.Tensor, act: torch.Tensor):
    """``params -> proxy loss`` closed over the proxy half, for :func:`weight_meta_gradient`."""

    def proxy_fn(params: Params) -> torch.Tensor:
        return proxy_loss(params, spec, obs, act)

    return proxy_fn
