"""Group-frequency weighting: every group weighs the same in expectation (docs/methods.md, Balanced BC).

Sampling q(s, a) = p(s, a) / rho_g, where rho_g is group g's share of the data, gives each of
the G groups total probability 1/G whatever its size.
"""

from __future__ import annotations

import numpy as np

from distcur.rebalance.group import alpha_to_sample_weights, check_groups


def frequency_alpha(group: np.ndarray, num_groups: int) -> np.ndarray:
    """Uniform group weights (G,) after checking that every group has samples."""
    check_groups(group, num_groups)
    return np.full(num_groups, 1.0 / num_groups)


def frequency_weights(group: np.ndarray, num_groups: int) -> np.ndarray:
    """Per-sample weights (N,) = N / (G n_g): mean 1, each group's total N / G."""
    return alpha_to_sample_weights(group, frequency_alpha(group, num_groups))
