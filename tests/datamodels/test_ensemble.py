"""Stacked training of k policies equals training each alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distcur.datamodels.subsets import SubsetTrainingData, train_subset_models
from distcur.policy.ensemble import (
    batch_weights,
    ensemble_loss,
    init_ensemble,
    sample_batches,
    train_ensemble,
    train_single,
)
from distcur.policy.functional import AdamConfig, PolicySpec, adam_init, bc_loss, init_params, unstack_params
from distcur.policy.proxy import proxy_loss

SPEC = PolicySpec(7, 3, (16, 16))
ADAM = AdamConfig(lr=3e-3)


def _pool(n=400, n_groups=10, seed=0):
    rng = np.random.default_rng(seed)
    obs = torch.as_tensor(rng.normal(size=(n, 7)), dtype=torch.float32)
    act = torch.as_tensor(np.tanh(rng.normal(size=(n, 3))), dtype=torch.float32)
    group = torch.as_tensor(np.where(rng.random(n) < 0.2, -1, rng.integers(0, n_groups, n)))
    return obs, act, group


def test_sample_batches_fixed_share_and_determinism():
    group = np.array([-1] * 10 + list(range(30)))
    b = sample_batches(group, 5, 20, 0.25, seed=3)
    assert b.shape == (5, 20)
    assert np.all(group[b[:, :5]] == -1) and np.all(group[b[:, 5:]] >= 0)
    np.testing.assert_array_equal(b, sample_batches(group, 5, 20, 0.25, seed=3))
    assert sample_batches(np.arange(5), 2, 4, 0.5, seed=0).max() < 5  # no injected rows: all from the prior


def test_batch_weights_keep_group_minus_one():
    masks = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = batch_weights(masks, torch.tensor([-1, 0, 1, 1]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]]))


def test_vectorised_training_equals_each_model_alone():
    obs, act, group = _pool()
    k, steps = 5, 12
    seeds = [3, 1, 4, 1, 5]
    masks = torch.as_tensor(np.random.default_rng(1).random((k, 10)) < 0.5, dtype=torch.float32)
    batches = sample_batches(group.numpy(), steps, 64, 0.25, seed=7)
    params, state = init_ensemble(SPEC, seeds)
    stacked, _, losses = train_ensemble(params, state, SPEC, ADAM, obs, act, group, masks, batches)
    assert losses.shape == (steps, k)
    proxy = ensemble_loss(stacked, SPEC, obs[:50], act[:50])
    proxy_mse = ensemble_loss(stacked, SPEC, obs[:50], act[:50], "mse")
    for i, p_vec in enumerate(unstack_params(stacked)):
        p0 = init_params(SPEC, seeds[i])
        alone, _, loss_alone = train_single(p0, adam_init(p0), SPEC, ADAM, obs, act, group, masks[i], batches)
        for name in p0:
            torch.testing.assert_close(p_vec[name], alone[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(losses[:, i], loss_alone, rtol=1e-4, atol=1e-5)
        assert float(proxy[i]) == pytest.approx(float(bc_loss(alone, obs[:50], act[:50], SPEC)), rel=1e-4)
        assert float(proxy_mse[i]) == pytest.approx(float(proxy_loss(alone, SPEC, obs[:50], act[:50], "mse")), rel=1e-4)
    # Models with different masks end up different: the masks really select data.
    assert not torch.allclose(stacked["h0.w"][1], stacked["h0.w"][3])


def test_masked_out_rows_do_not_train_a_model():
    obs, act, group = _pool()
    batches = sample_batches(group.numpy(), 6, 64, 0.25, seed=2)
    masks = torch.tensor([[1.0] * 10, [1.0] * 10])
    masks[1, 4] = 0.0
    # Moving every row of group 4 changes model 0 but not model 1 (which drops group 4).
    act2 = act.clone()
    act2[group == 4] = -act2[group == 4]
    params, state = init_ensemble(SPEC, [0, 0])
    a, _, _ = train_ensemble(params, state, SPEC, ADAM, obs, act, group, masks, batches)
    params, state = init_ensemble(SPEC, [0, 0])
    b, _, _ = train_ensemble(params, state, SPEC, ADAM, obs, act2, group, masks, batches)
    assert not torch.allclose(a["mean.w"][0], b["mean.w"][0])
    torch.testing.assert_close(a["mean.w"][1], b["mean.w"][1], rtol=0, atol=0)


def test_train_subset_models_returns_one_proxy_per_model():
    obs, act, group = _pool()
    data = SubsetTrainingData(obs.numpy(), act.numpy(), group.numpy(), 10, obs[:40].numpy(), act[:40].numpy())
    masks = np.random.default_rng(0).random((3, 10)) < 0.5
    y = train_subset_models(data, masks, np.zeros(3, int), SPEC, ADAM, steps=5, batch_size=32,
                            target_fraction=0.25, batch_seed=0)
    assert y.shape == (3,) and np.all(np.isfinite(y))
    with pytest.raises(ValueError, match="masks"):
        train_subset_models(data, masks[:, :4], np.zeros(3, int), SPEC, ADAM, 5, 32, 0.25, 0)
