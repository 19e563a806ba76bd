"""A trained policy as a picklable callable ``obs (B, state_dim) -> act (B, action_dim)``.

What rollouts (``distcur.envs.rollouts``) and the proxy loss take. It carries plain
tensors, the :class:`PolicySpec` and the :class:`Normalizer`, so it pickles to Ray tasks, and it
loads from the store with ``torch.load(weights_only=True)``
(:func:`distcur.stages.train.load_policy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distcur.policy import checkpoint as ckpt
from distcur.policy.actions import ActionStandardizer
from distcur.policy.functional import Normalizer, Params, PolicySpec, act_deterministic, policy_forward


@dataclass
class TrainedPolicy:
    """Greedy (tanh of the mean) actions of a trained policy, batched.

    ``action_norm``: set when the policy was trained on actions standardised per source; its
    predictions are then mapped back to the target source's action space (and demos' actions into
    the standardised space for the proxy loss)."""

    params: Params
    spec: PolicySpec
    normalizer: Normalizer
    action_norm: ActionStandardizer | None = None

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """``obs`` (B, state_dim) or (state_dim,) raw states -> raw actions of the same leading shape."""
        obs = np.asarray(obs, np.float32)
        single = obs.ndim == 1
        act = act_deterministic(self.params, self.spec, self.normalizer, obs[None] if single else obs)
        if self.action_norm is not None:
            act = self.action_norm.undo(act)
        return act[0] if single else act

    def training_actions(self, actions: np.ndarray) -> np.ndarray:
        """Raw actions of the target's space -> the space the policy was trained in (the identity
        unless its actions were standardised per source)."""
        return actions if self.action_norm is None else self.action_norm.to_output(actions)

    def distribution(self, obs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std) of the pre-tanh Gaussian for raw states ``obs`` (B, state_dim)."""
        with torch.no_grad():
            return policy_forward(self.params, torch.as_tensor(self.normalizer.state(obs)), self.spec)

    @classmethod
    def from_state(cls, state: dict) -> TrainedPolicy:
        params, spec, normalizer = ckpt.unpack(state)
        norm = state["meta"].get("action_norm")
        return cls(params=params, spec=spec, normalizer=normalizer,
                   action_norm=ActionStandardizer.from_dict(norm) if norm else None)
