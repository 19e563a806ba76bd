"""The proxy metric read from the store: held-out target demos, and a policy's proxy on them.

The metric itself (``nll`` or ``mse``) is :mod:`distcur.policy.proxy`; the demo and ``distcur
evaluate`` report the ``nll`` kind.
"""

from __future__ import annotations

import numpy as np

from distcur.data import StepArrays, load_steps, steps_key
from distcur.policy.loaded import TrainedPolicy
from distcur.policy.proxy import policy_proxy
from distcur.store import Store


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


def proxy_loss_on_source(policy: TrainedPolicy, store: Store, source: str, episodes: list[int] | None = None,
                         kind: str = "nll") -> float:
    """The ``kind`` proxy (:mod:`distcur.policy.proxy`) of ``policy`` on the steps of ``source``."""
    steps = load_heldout(store, source, episodes)
    return policy_proxy(policy, steps.state, steps.action, kind)
