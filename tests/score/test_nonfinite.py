"""Non-finite values found by the scorers and the VAE name the source, episode and step of the bad
row (a row number cannot be looked up in the store)."""

from __future__ import annotations

import numpy as np
import pytest

from distcur.embed.vae import VAEConfig, train_vae
from distcur.schema import describe_row
from distcur.score.kde import check_points
from distcur.score.nearest import check_features, min_distances
from distcur.score.strap import target_segments

WHERE = "source='prior-a', episode=12, step=5"


def _keyed(n: int, bad_row: int, dim: int = 3):
    x = np.zeros((n, dim))
    x[bad_row, 1] = np.inf
    episode = np.full(n, 12)
    step = np.arange(n) + 5 - bad_row
    return x, ("prior-a", episode, step)


def test_describe_row_with_and_without_keys():
    assert describe_row(3) == "row 3"
    assert describe_row(1, (np.array(["a", "b"]), np.array([4, 9]), np.array([0, 2]))) == \
        "source='b', episode=9, step=2"


def test_nearest_names_prior_and_target_steps():
    x, keys = _keyed(6, 2)
    with pytest.raises(ValueError, match=f"non-finite value in prior at {WHERE}"):
        min_distances(x, np.zeros((1, 3)), prior_keys=keys)
    with pytest.raises(ValueError, match=f"non-finite value in target at {WHERE}"):
        check_features(np.zeros((0, 3)), x, target_keys=keys)


def test_kde_points_name_the_step():
    x, keys = _keyed(4, 3)
    with pytest.raises(ValueError, match=f"non-finite value inf at {WHERE}, dimension 1"):
        check_points(x, "target embeddings", keys=keys)


def test_strap_target_names_the_step():
    x, (_, episode, step) = _keyed(8, 4)
    with pytest.raises(ValueError, match="non-finite target embedding at source='target-reach', episode=12, step=5"):
        target_segments(x, np.zeros((8, 3)), episode, step, source="target-reach")


def test_vae_names_the_sample_step():
    x, keys = _keyed(5, 1)
    with pytest.raises(ValueError, match=f"train_vae: non-finite state at {WHERE}"):
        train_vae(x, np.zeros((5, 2)), VAEConfig(train_steps=1), keys)
