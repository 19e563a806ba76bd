"""Group weights, DRO on balanced data, bad input (the rebalance stage end to end: tests/stages/test_rebalance.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distcur.policy.functional import PolicySpec
from distcur.rebalance.dro import DROConfig, dro_rebalance, dro_update, group_mean_losses
from distcur.rebalance.frequency import frequency_weights
from distcur.rebalance.group import (
    alpha_to_sample_weights,
    check_alpha,
    check_groups,
    groups_from_labels,
    kmeans_groups,
)
from distcur.rebalance.metagrad import MetaGradConfig, metagrad_rebalance
from distcur.rebalance.toy2d import make_toy2d

SPEC = PolicySpec(2, 2, (16, 16))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    return make_toy2d(n_frequent=600, ratio=10.0, seed=1)


# -- weights ---------------------------------------------------------------------------------
def test_sample_weights_give_each_group_its_alpha_share():
    group = np.array([0] * 90 + [1] * 9 + [2] * 1)
    alpha = np.array([0.2, 0.3, 0.5])
    w = alpha_to_sample_weights(group, alpha)
    assert w.mean() == pytest.approx(1.0, rel=1e-6)
    shares = np.bincount(group, weights=w) / w.sum()
    np.testing.assert_allclose(shares, alpha, rtol=1e-6)
    fw = frequency_weights(group, 3)
    np.testing.assert_allclose(np.bincount(group, weights=fw), [100 / 3] * 3, rtol=1e-5)


def test_dro_update_stays_on_the_simplex_and_above_the_smoothing_floor():
    rng = np.random.default_rng(0)
    alpha = np.full(4, 0.25)
    for _ in range(500):
        excess = np.maximum(rng.normal(0, 5, 4), 0) * rng.integers(0, 2, 4)
        alpha = dro_update(alpha, excess, eta=0.2, smoothing=0.05)
        assert alpha.sum() == pytest.approx(1.0, abs=1e-12)
        assert (alpha >= 0.05 / 4 - 1e-12).all()
    # The largest excess always gains weight.
    up = dro_update(np.full(3, 1 / 3), np.array([0.0, 1.0, 0.0]), eta=0.2, smoothing=0.05)
    assert up[1] > 1 / 3 > up[0] == pytest.approx(up[2])


def test_dro_weights_converge_to_uniform_on_balanced_data(toy):
    # Three groups that are random thirds of one behaviour: nothing to rebalance.
    frequent = toy.behaviour == "frequent"
    obs, act = toy.state[frequent], toy.action[frequent]
    group = np.random.default_rng(0).permutation(np.arange(len(obs)) % 3)
    cfg = DROConfig(steps=200, reference_steps=200, batch_size=192, lr=3e-3)
    res = dro_rebalance(obs, act, group, 3, SPEC, cfg, seed=0)
    # Early steps, where the proxy is far from the reference, are noisy; the trajectory settles.
    np.testing.assert_allclose(res.history[100:].mean(0), [1 / 3] * 3, atol=0.05)
    np.testing.assert_allclose(res.alpha, [1 / 3] * 3, atol=0.08)
    assert np.allclose(res.history.sum(1), 1.0) and (res.history > 0).all()
    check_alpha(res.alpha)


# -- bad input -------------------------------------------------------------------------------
def test_a_group_with_no_samples_is_an_error():
    with pytest.raises(ValueError, match="group 'c' has no samples"):
        check_groups(np.array([0, 0, 1]), 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="no samples"):
        frequency_weights(np.array([0, 2, 2]), 3)
    with pytest.raises(ValueError, match="no samples"):
        dro_rebalance(np.zeros((4, 2)), np.zeros((4, 2)), np.array([0, 0, 2, 2]), 3, SPEC, seed=0)


def test_one_group_only_is_an_error(toy):
    with pytest.raises(ValueError, match="at least 2 groups"):
        groups_from_labels(["pick"] * 10)
    with pytest.raises(ValueError, match="at least 2 groups"):
        metagrad_rebalance(toy.state, toy.action, np.zeros(len(toy), np.int64), 1, SPEC)


def test_nan_losses_are_an_error(toy):
    act = toy.action.copy()
    rare_row = int(np.flatnonzero(toy.behaviour == "rare")[0])
    act[rare_row:, 0] = np.nan  # the rare group's actions
    group = groups_from_labels(toy.behaviour).group
    cfg = DROConfig(steps=5, reference_steps=5, batch_size=32)
    with pytest.raises(ValueError, match=f"non-finite action at row {rare_row} .group 1"):
        dro_rebalance(toy.state, act, group, 2, SPEC, cfg, seed=0)
    nll = torch.tensor([0.1, 0.2, float("nan"), 0.3])
    with pytest.raises(ValueError, match="non-finite loss nan for group 1"):
        group_mean_losses(nll, torch.tensor([0, 0, 1, 1]), 2)
    with pytest.raises(ValueError, match="non-finite excess loss nan for group 0"):
        dro_update(np.array([0.5, 0.5]), np.array([np.nan, 0.0]), 0.2, 0.05)
    with pytest.raises(ValueError, match=f"non-finite action at row {rare_row} .group 1"):
        metagrad_rebalance(toy.state, act, group, 2, SPEC, MetaGradConfig(outer_steps=1, inner_steps=2))


def test_bad_alpha_is_an_error():
    with pytest.raises(ValueError, match="sum to 1"):
        check_alpha(np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match="strictly positive"):
        check_alpha(np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="non-finite"):
        check_alpha(np.array([np.nan, 1.0]))


# -- groups ----------------------------------------------------------------------------------
def test_kmeans_finds_the_two_behaviours_and_reports_k(toy):
    labels = groups_from_labels(toy.behaviour).group
    found = kmeans_groups(np.concatenate([toy.state, toy.action], 1), k_range=(2, 5), seed=0)
    assert found.k == 2 and found.method == "kmeans"
    assert set(found.silhouette) == {2, 3, 4, 5} and max(found.silhouette, key=found.silhouette.get) == 2
    agreement = max((found.group == labels).mean(), (found.group != labels).mean())
    assert agreement > 0.97
