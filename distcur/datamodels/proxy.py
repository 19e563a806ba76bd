"""DataMIL's target injection: the target demos split into an injected half and a proxy half.

The target demonstrations are split in half by episode: one half (``inject``) is mixed into
every training run of the estimation, the other (``proxy``) defines the proxy metric, a loss
of the trained policy on it (:mod:`distcur.policy.proxy`: ``nll`` or ``mse``). Lower is better;
a datamodel scores a cluster by how much including it lowers this loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distcur.data import StepArrays


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
