"""The proxy metric: behaviour-cloning loss of a policy on held-out target demonstrations.

DataMIL scores data by its effect on this number instead of on rollouts: the mean tanh-Gaussian
NLL (nats per step, summed over action dims) of the demos' actions under the policy, with states
and actions normalised by the policy's own :class:`Normalizer`. Lower is better.
"""

from __future__ import annotations

import numpy as np
import torch

from distcur.data import StepArrays, load_steps, steps_key
from distcur.policy.functional import bc_loss
from distcur.policy.loaded import TrainedPolicy
from distcur.store import Store


def proxy_loss(policy: TrainedPolicy, states: np.ndarray, actions: np.ndarray, batch_size: int = 65536) -> float:
    """Mean NLL of ``actions`` (N, action_dim) given ``states`` (N, state_dim), raw units."""
    states, actions = np.asarray(states, np.float32), np.asarray(actions, np.float32)
    if states.ndim != 2 or actions.ndim != 2 or len(states) != len(actions) or len(states) == 0:
        raise ValueError(f"proxy_loss: expected (N, ds) states and (N, da) actions with N > 0, got "
                         f"{states.shape} and {actions.shape}")
    if states.shape[1] != policy.spec.state_dim or actions.shape[1] != policy.spec.action_dim:
        raise ValueError(f"proxy_loss: data dims {states.shape[1]}/{actions.shape[1]} do not match the policy's "
                         f"{policy.spec.state_dim}/{policy.spec.action_dim}")
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(states), batch_size):
            obs = torch.from_numpy(policy.normalizer.state(states[start : start + batch_size]))
            act = torch.from_numpy(policy.normalizer.action(policy.training_actions(actions[start : start + batch_size])))
            total += float(bc_loss(policy.params, obs, act, policy.spec)) * len(obs)
    return total / len(states)


def load_heldout(store: Store, source: str, episodes: list[int] | None = None) -> StepArrays:
    """Steps of ``source`` (optionally only ``episodes``) to compute the proxy on."""
    if store.manifest(steps_key(source)) is None:
        raise FileNotFoundError(f"no committed step table at {store.uri_of(steps_key(source))} for the proxy")
    steps = load_steps(store, [source])
    if episodes is not None:
        keep = np.isin(steps.episode, np.asarray(episodes, np.int64))
        if not keep.any():
            raise ValueError(f"none of episodes {episodes[:10]} is in {store.uri_of(steps_key(source))}")
        steps = steps.take(np.flatnonzero(keep))
    return steps


def proxy_loss_on_source(policy: TrainedPolicy, store: Store, source: str, episodes: list[int] | None = None) -> float:
    steps = load_heldout(store, source, episodes)
    return proxy_loss(policy, steps.state, steps.action)
