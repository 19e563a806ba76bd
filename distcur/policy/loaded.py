"""A trained policy as a picklable callable ``obs (B, state_dim) -> act (B, action_dim)``.

What rollouts (``distcur.evaluate.metaworld``) and the proxy loss take. It carries plain
tensors, the :class:`PolicySpec` and the :class:`Normalizer`, so it pickles to Ray tasks, and it
loads from the store with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distcur.policy import checkpoint as ckpt
from distcur.policy.functional import Normalizer, Params, PolicySpec, act_deterministic, policy_forward
from distcur.store import Store


@dataclass
class TrainedPolicy:
    """Greedy (tanh of the mean) actions of a trained policy, batched."""

    params: Params
    spec: PolicySpec
    normalizer: Normalizer

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """``obs`` (B, state_dim) or (state_dim,) raw states -> raw actions of the same leading shape."""
        obs = np.asarray(obs, np.float32)
        single = obs.ndim == 1
        act = act_deterministic(self.params, self.spec, self.normalizer, obs[None] if single else obs)
        return act[0] if single else act

    def distribution(self, obs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std) of the pre-tanh Gaussian for raw states ``obs`` (B, state_dim)."""
        with torch.no_grad():
            return policy_forward(self.params, torch.as_tensor(self.normalizer.state(obs)), self.spec)

    @classmethod
    def from_state(cls, state: dict) -> TrainedPolicy:
        params, spec, normalizer = ckpt.unpack(state)
        return cls(params=params, spec=spec, normalizer=normalizer)

    @classmethod
    def load(cls, store: Store, run_or_key: str) -> TrainedPolicy:
        """``policies/<run>/policy.pt`` (or an explicit ``.pt`` key, e.g. a training checkpoint)."""
        return cls.from_state(ckpt.load_policy_state(store, run_or_key))
