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
    stacked_forward,
    train_ensemble,
    train_single,
)
from distcur.policy.functional import (
    AdamConfig,
    PolicySpec,
    adam_init,
    adam_update,
    bc_loss,
    init_params,
    stack_params,
    tanh_gaussian_nll,
    unstack_params,
)
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


def _reference_train(params, state, spec, adam, obs, act, group, masks, batches, normalize):
    """The straightforward stacked step: autograd through stacked_forward's summed loss, then
    adam_update (the differentiable Adam) on each model alone."""
    p = {n: t.clone() for n, t in params.items()}
    per_model = [{"m": {n: state["m"][n][i] for n in p}, "v": {n: state["v"][n][i] for n in p}, "t": state["t"][i]}
                 for i in range(len(state["t"]))]
    losses = []
    for idx in batches:
        rows = torch.as_tensor(idx)
        w = batch_weights(masks.to(obs.dtype), group[rows])
        leaves = {n: t.detach().requires_grad_(True) for n, t in p.items()}
        nll = tanh_gaussian_nll(*stacked_forward(leaves, obs[rows], spec), act[rows])
        loss = (w * nll).sum(1) / w.sum(1).clamp_min(1e-12) if normalize == "weights" else (w * nll).mean(1)
        grads = dict(zip(leaves, torch.autograd.grad(loss.sum(), list(leaves.values()))))
        new = []
        with torch.no_grad():
            for i, st in enumerate(per_model):
                pi, per_model[i] = adam_update({n: p[n][i] for n in p}, {n: grads[n][i] for n in p}, st, adam)
                new.append(pi)
        p = stack_params(new)
        losses.append(loss.detach())
    out_state = {"m": stack_params([s["m"] for s in per_model]), "v": stack_params([s["v"] for s in per_model]),
                 "t": torch.stack([s["t"] for s in per_model])}
    return p, out_state, torch.stack(losses)


@pytest.mark.parametrize("case", ["default", "deep_batch_decay_uneven_t", "float64"])
def test_optimised_step_equals_straightforward_reference(case):
    """The hand-written backward, fused Adam over flat buffers and model chunks give the same
    parameters, moments, step counts and losses as autograd + adam_update, to 1e-5 (1e-10 in
    float64), with chunks that do not divide k, a clamped log-std head and per-model step counts."""
    dtype = torch.float64 if case == "float64" else torch.float32
    spec = PolicySpec(7, 3, (16, 12, 8)) if case == "deep_batch_decay_uneven_t" else SPEC
    adam = AdamConfig(lr=3e-3, weight_decay=1e-2) if case == "deep_batch_decay_uneven_t" else ADAM
    normalize = "batch" if case == "deep_batch_decay_uneven_t" else "weights"
    obs, act, group = _pool()
    obs, act = obs.to(dtype), act.to(dtype)
    k = 4
    masks = torch.as_tensor(np.random.default_rng(5).random((k, 10)) < 0.5, dtype=torch.float32)
    masks[2] = 0.0  # a model that keeps only the injected rows
    batches = sample_batches(group.numpy(), 8, 48, 0.25, seed=11)
    params, state = init_ensemble(spec, [2, 7, 1, 8], dtype)
    params["log_std.b"][1] = 3.0  # above log_std_max: clamped, so that head gets no gradient from the NLL
    if case == "deep_batch_decay_uneven_t":
        g = torch.Generator().manual_seed(0)
        state["m"] = {n: 1e-3 * torch.randn(t.shape, generator=g) for n, t in params.items()}
        state["v"] = {n: 1e-6 * torch.rand(t.shape, generator=g) for n, t in params.items()}
        state["t"] = torch.tensor([0.0, 3.0, 3.0, 5.0], dtype=torch.float64)
    want_p, want_s, want_l = _reference_train(params, state, spec, adam, obs, act, group, masks, batches, normalize)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    before = {n: t.clone() for n, t in params.items()}
    for chunk in (3, 1, None):
        got_p, got_s, got_l = train_ensemble(params, state, spec, adam, obs, act, group, masks, batches,
                                             normalize, chunk=chunk)
        for name in params:
            torch.testing.assert_close(got_p[name], want_p[name], **tol)
            torch.testing.assert_close(got_s["m"][name], want_s["m"][name], **tol)
            torch.testing.assert_close(got_s["v"][name], want_s["v"][name], **tol)
            assert got_p[name].dtype == dtype and got_p[name].is_contiguous()
        torch.testing.assert_close(got_s["t"], want_s["t"].to(torch.float64))
        torch.testing.assert_close(got_l, want_l, **tol)
    for name in params:  # the inputs are not modified
        torch.testing.assert_close(params[name], before[name], rtol=0, atol=0)
    assert not torch.equal(got_p["h0.w"], params["h0.w"])  # it trained
    assert torch.equal(got_p["log_std.w"][1], params["log_std.w"][1]) or case == "deep_batch_decay_uneven_t"


def test_train_ensemble_rejects_bad_batches_and_chunk():
    obs, act, group = _pool()
    params, state = init_ensemble(SPEC, [0, 1])
    masks = torch.ones(2, 10)
    with pytest.raises(ValueError, match="batches must be"):
        train_ensemble(params, state, SPEC, ADAM, obs, act, group, masks, np.arange(8))
    with pytest.raises(ValueError, match="chunk"):
        train_ensemble(params, state, SPEC, ADAM, obs, act, group, masks, np.zeros((2, 8), np.int64), chunk=0)
