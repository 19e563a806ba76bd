"""A 2-D imbalanced-behaviour dataset with a known answer (fast tests and the toy benchmark).

Two behaviours act in overlapping regions of a 2-D state space: the *frequent* one (states
around (-0.5, 0)) pushes right, the *rare* one (states around (+0.5, 0)) pushes left, and the
frequent one has ``ratio`` times more samples. Where the regions overlap, a policy trained by BC
with every pair weighted equally follows the posterior-weighted mean action, so the frequency
ratio, not the state, decides which behaviour it imitates: on the rare behaviour's own states
uniform BC mostly pushes right. Rebalancing the two behaviours to equal weight restores the rare
action there. :func:`bayes_action` gives that optimum in closed form for any group weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distcur.policy.functional import Params, PolicySpec, policy_forward

CENTERS = np.array([[-0.5, 0.0], [0.5, 0.0]])  # frequent, rare
STATE_STD = 0.5
ACTION_X = np.array([0.6, -0.6])  # frequent pushes right, rare pushes left
ACTION_NOISE = 0.05
BEHAVIOURS = ("frequent", "rare")


@dataclass
class Toy2D:
    state: np.ndarray  # (N, 2) float32
    action: np.ndarray  # (N, 2) float32, in (-1, 1)
    behaviour: np.ndarray  # (N,) object: "frequent" / "rare"
    episode: np.ndarray  # (N,) int64, ``episode_len`` consecutive rows of one behaviour
    step: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.state)

    def steps_columns(self, source: str = "toy2d") -> dict:
        """Columns for :func:`distcur.schema.steps_table` (behaviour stored as the task)."""
        n = len(self)
        is_first = self.step == 0
        is_last = np.append(self.episode[1:] != self.episode[:-1], True)
        return {
            "source": source,
            "episode": self.episode,
            "step": self.step,
            "task": self.behaviour.astype(str).tolist(),
            "state": self.state,
            "action": self.action,
            "reward": np.zeros(n, np.float32),
            "is_first": is_first,
            "is_last": is_last,
            "is_terminal": is_last,
            "success": np.ones(n, bool),
        }


def expert_action(state: np.ndarray, behaviour: int) -> np.ndarray:
    """Noise-free action (N, 2) of behaviour 0 (frequent) or 1 (rare)."""
    state = np.asarray(state, np.float64)
    ax = np.full(len(state), ACTION_X[behaviour])
    ay = np.clip(-0.3 * state[:, 1], -0.5, 0.5) * np.sign(ACTION_X[behaviour])
    return np.stack([ax, ay], 1)


def sample_states(n: int, behaviour: int, rng: np.random.Generator) -> np.ndarray:
    return (CENTERS[behaviour] + STATE_STD * rng.standard_normal((n, 2))).astype(np.float32)


def make_toy2d(n_frequent: int = 2000, ratio: float = 10.0, seed: int = 0, episode_len: int = 20,
               n_corrupt: int = 0) -> Toy2D:
    """``n_frequent`` frequent and ``n_frequent / ratio`` rare state-action pairs, in episodes.

    ``n_corrupt`` > 0 adds that many *mislabelled* pairs (behaviour ``"corrupt"``): states of the
    rare behaviour, actions of the frequent one, as a batch of bad teleoperation would give. Their
    loss stays high whatever the weights, so loss-driven (DRO) and size-driven (frequency)
    reweighting both feed them to the policy, at the rare behaviour's expense.
    """
    if ratio < 1 or n_frequent < episode_len:
        raise ValueError(f"make_toy2d: need ratio >= 1 and n_frequent >= episode_len, got {ratio}, {n_frequent}")
    rng = np.random.default_rng(seed)
    # (label, state region, action behaviour, episodes) per block
    blocks = [(BEHAVIOURS[0], 0, 0, n_frequent // episode_len),
              (BEHAVIOURS[1], 1, 1, max(1, int(round(n_frequent / ratio / episode_len))))]
    if n_corrupt > 0:
        blocks.append(("corrupt", 1, 0, max(1, int(round(n_corrupt / episode_len)))))
    n_episodes = sum(ne for *_, ne in blocks)
    states, actions, labels = [], [], []
    for label, region, acts_as, ne in blocks:
        s = sample_states(ne * episode_len, region, rng)
        a = expert_action(s, acts_as) + ACTION_NOISE * rng.standard_normal((len(s), 2))
        states.append(s)
        actions.append(np.clip(a, -0.99, 0.99).astype(np.float32))
        labels.append(np.full(len(s), label, dtype=object))
    n = n_episodes * episode_len
    return Toy2D(
        state=np.concatenate(states),
        action=np.concatenate(actions),
        behaviour=np.concatenate(labels),
        episode=np.repeat(np.arange(n_episodes, dtype=np.int64), episode_len),
        step=np.tile(np.arange(episode_len, dtype=np.int32), n // episode_len),
    )


def bayes_action(state: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The weighted-BC optimum (N, 2): mean action under the group posterior at each state.

    ``alpha`` (2,) is each behaviour's share of the (re)weighted data; the states of both
    behaviours are isotropic Gaussians with the same spread, so the posterior is closed form.
    """
    state = np.asarray(state, np.float64)
    logp = np.stack([np.log(alpha[b]) - ((state - CENTERS[b]) ** 2).sum(1) / (2 * STATE_STD**2) for b in (0, 1)], 1)
    post = np.exp(logp - logp.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    return post[:, :1] * expert_action(state, 0) + post[:, 1:] * expert_action(state, 1)


def action_errors(params: Params, spec: PolicySpec, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Mean L2 error of the greedy action tanh(mean) against each behaviour on its own states.

    States are fresh draws from each behaviour's state distribution (the policy sees raw
    states: the toy's states are already of unit scale).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for b, name in enumerate(BEHAVIOURS):
        s = sample_states(n, b, rng)
        with torch.no_grad():
            mean, _ = policy_forward(params, torch.as_tensor(s), spec)
        a = torch.tanh(mean).numpy()
        out[name] = float(np.linalg.norm(a - expert_action(s, b), axis=1).mean())
    return out


def bayes_errors(alpha: np.ndarray, n: int = 20000, seed: int = 12345) -> dict[str, float]:
    """The errors :func:`action_errors` would measure for the exact weighted-BC optimum."""
    rng = np.random.default_rng(seed)
    out = {}
    for b, name in enumerate(BEHAVIOURS):
        s = sample_states(n, b, rng)
        out[name] = float(np.linalg.norm(bayes_action(s, alpha) - expert_action(s, b), axis=1).mean())
    return out
