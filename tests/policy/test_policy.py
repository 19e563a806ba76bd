"""Policy loss, mixture sampler, weighted co-training, checkpoints and resume (no Ray); the training
data from the store and the policies in it: tests/stages/test_train.py."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from policy_factory import ACTION_DIM, STATE_DIM, toy_store_factory
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from distcur.policy import checkpoint as ckpt
from distcur.policy.functional import (
    AdamConfig,
    PolicySpec,
    adam_init,
    bc_loss,
    init_params,
    make_train_step,
    policy_forward,
    tanh_gaussian_nll,
)
from distcur.policy.loaded import TrainedPolicy
from distcur.policy.proxy import policy_proxy
from distcur.policy.sampler import MixtureSampler
from distcur.policy.train import TrainConfig, train_policy
from distcur.stages.evaluate import proxy_loss_on_source
from distcur.stages.train import baseline_selection, load_training_data, train_to_store

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: threads only contend

TINY = dict(hidden=(32, 32), batch_size=64, steps=30, checkpoint_every=10, log_every=5)


@pytest.fixture
def store_factory(tmp_path):
    return toy_store_factory(tmp_path)


# -- the tanh-Gaussian head ------------------------------------------------------------------


def test_tanh_gaussian_nll_and_gradients_match_torch_distributions():
    torch.manual_seed(0)
    spec = PolicySpec(STATE_DIM, ACTION_DIM, hidden=(16, 16))
    params = init_params(spec, seed=3, dtype=torch.float64)
    obs = torch.randn(50, STATE_DIM, dtype=torch.float64)
    act = torch.empty(50, ACTION_DIM, dtype=torch.float64).uniform_(-0.95, 0.95)

    def reference_loss(p):
        mean, log_std = policy_forward(p, obs, spec)
        dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
        return -dist.log_prob(act).sum(-1).mean()

    ours = bc_loss(params, obs, act, spec)
    ref = reference_loss(params)
    # functional.py keeps an eps of 1e-6 inside log(1 - a^2): a relative bias below 1e-4 here.
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4)
    g_ours = torch.func.grad(lambda p: bc_loss(p, obs, act, spec))(params)
    g_ref = torch.func.grad(reference_loss)(params)
    for k in params:
        torch.testing.assert_close(g_ours[k], g_ref[k], rtol=1e-4, atol=1e-7)


def test_tanh_gaussian_nll_manual_float64_formula_and_log_std_clip():
    mean = torch.tensor([[0.3, -1.0]], dtype=torch.float64)
    log_std = torch.tensor([[-0.5, 2.0]], dtype=torch.float64)
    act = torch.tensor([[0.2, -0.7]], dtype=torch.float64)
    expected = 0.0
    for m, ls, a in zip(mean[0].tolist(), log_std[0].tolist(), act[0].tolist()):
        u = math.atanh(a)
        expected -= -0.5 * ((u - m) / math.exp(ls)) ** 2 - ls - 0.5 * math.log(2 * math.pi) - math.log(1 - a * a)
    assert tanh_gaussian_nll(mean, log_std, act).item() == pytest.approx(expected, rel=1e-5)
    spec = PolicySpec(1, 1, hidden=(1,))
    params = {k: torch.zeros_like(v) for k, v in init_params(spec).items()}
    params["log_std.b"] = torch.tensor([50.0])
    assert policy_forward(params, torch.zeros(1, 1), spec)[1].item() == 2.0
    params["log_std.b"] = torch.tensor([-50.0])
    assert policy_forward(params, torch.zeros(1, 1), spec)[1].item() == -20.0


def test_zero_weights_equal_dropping_samples():
    spec = PolicySpec(STATE_DIM, ACTION_DIM, hidden=(16,))
    params = init_params(spec, seed=1)
    obs = torch.randn(40, STATE_DIM)
    act = torch.rand(40, ACTION_DIM) * 1.8 - 0.9
    w = torch.rand(40) + 0.5
    w[::3] = 0.0
    keep = w > 0
    assert bc_loss(params, obs, act, spec, w).item() == pytest.approx(
        bc_loss(params, obs[keep], act[keep], spec, w[keep]).item(), rel=1e-6)
    step = make_train_step(spec, AdamConfig(lr=1e-2))
    p_a, _, _ = step(params, adam_init(params), obs, act, w)
    p_b, _, _ = step(params, adam_init(params), obs[keep], act[keep], w[keep])
    for k in params:
        torch.testing.assert_close(p_a[k], p_b[k], rtol=1e-5, atol=1e-6)


# -- sampler ---------------------------------------------------------------------------------


def test_sampler_proportions_hit_alpha_and_weights():
    weights = np.array([0.0, 1.0, 2.0, 0.0, 5.0])
    sampler = MixtureSampler(n_target=7, prior_weights=weights, alpha=0.3, batch_size=1000, seed=4)
    idx = np.concatenate([sampler.batch(s)[0] for s in range(20)])
    n = len(idx)
    frac_target = np.mean(idx < 7)
    assert abs(frac_target - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)  # 5 sigma
    prior = idx[idx >= 7] - 7
    counts = np.bincount(prior, minlength=5)
    assert counts[0] == 0 and counts[3] == 0  # zero weight: never drawn
    expected = weights / weights.sum() * len(prior)
    chi2 = ((counts[[1, 2, 4]] - expected[[1, 2, 4]]) ** 2 / expected[[1, 2, 4]]).sum()
    assert chi2 < 20  # 2 dof; P(chi2 > 20) ~ 5e-5
    target = np.bincount(idx[idx < 7], minlength=7)
    assert target.min() > 0


def test_split_mixing_puts_exactly_alpha_target_rows_in_every_batch():
    sampler = MixtureSampler(7, np.array([1.0, 0.0, 3.0]), alpha=0.5, batch_size=33, seed=2, mixing="split")
    for step in range(5):
        idx, w = sampler.batch(step)
        assert (idx[:16] < 7).all() and (idx[16:] >= 7).all() and not (idx == 8).any() and (w == 1).all()
    assert sampler.state()["mixing"] == "split"
    with pytest.raises(ValueError, match="mixing must be one of"):
        MixtureSampler(7, np.ones(3), 0.5, 8, 0, mixing="halves")


def test_sampler_is_pure_function_of_seed_and_step_and_loss_weighting():
    a = MixtureSampler(5, np.ones(8), 0.5, 64, seed=1)
    b = MixtureSampler(5, np.ones(8), 0.5, 64, seed=1)
    np.testing.assert_array_equal(a.batch(17)[0], b.batch(17)[0])
    assert not np.array_equal(a.batch(17)[0], a.batch(18)[0])
    assert not np.array_equal(a.batch(17)[0], MixtureSampler(5, np.ones(8), 0.5, 64, seed=2).batch(17)[0])
    w = np.array([1.0, 3.0])
    lw = MixtureSampler(5, w, 0.0, 4000, seed=0, weighting="loss")
    idx, loss_w = lw.batch(0)
    assert abs(np.mean(idx == 5) - 0.5) < 0.05  # uniform draws
    np.testing.assert_allclose(loss_w[idx == 5], 0.5)
    np.testing.assert_allclose(loss_w[idx == 6], 1.5)
    only_target = MixtureSampler(5, np.zeros(0), 0.2, 100, seed=0)
    assert (only_target.batch(3)[0] < 5).all()
    with pytest.raises(ValueError, match="alpha"):
        MixtureSampler(5, w, 1.5, 10, 0)


# -- training, determinism, resume, checkpoints ---------------------------------------------


def test_training_is_deterministic_and_learns(store_factory):
    store = store_factory()
    data = load_training_data(store, "target-toy", baseline_selection(store, "all"))
    cfg = TrainConfig(**{**TINY, "steps": 60, "lr": 3e-3})
    p1, n1, h1 = train_policy(data, cfg)
    p2, _, h2 = train_policy(data, cfg)
    for k in p1:
        assert torch.equal(p1[k], p2[k])
    assert h1 == h2 and h1[-1]["loss"] < h1[0]["loss"] - 1.0
    p3, _, _ = train_policy(data, TrainConfig(**{**TINY, "steps": 1, "seed": 1}))
    assert not torch.equal(p1["h0.w"], p3["h0.w"])
    np.testing.assert_allclose(n1.state_mean, data.obs.mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighting", ["sample", "loss"])
def test_resume_matches_uninterrupted_run(store_factory, weighting):
    store = store_factory()
    sel = baseline_selection(store, "all").set_column(3, "weight", pa.array(np.linspace(0, 2, 200), pa.float32()))
    data = load_training_data(store, "target-toy", sel)
    cfg = TrainConfig(**{**TINY, "weighting": weighting})
    saved = {}
    p_full, _, h_full = train_policy(data, cfg, checkpoint_fn=lambda s: saved.setdefault(s["step"], ckpt.to_bytes(s)))
    assert sorted(saved) == [10, 20, 30]
    state = torch.load(io.BytesIO(saved[10]), weights_only=True)
    p_res, _, h_res = train_policy(data, cfg, resume_from=state)
    for k in p_full:
        assert torch.equal(p_full[k], p_res[k]), k
    assert h_res == h_full
    with pytest.raises(ValueError, match="different config.*lr"):
        train_policy(data, TrainConfig(**{**TINY, "weighting": weighting, "lr": 0.5}), resume_from=state)


def test_proxy_loss_drops_with_training(store_factory):
    store = store_factory(n_target=22)
    train = load_training_data(store, "target-toy", None, target_episodes=list(range(20)))
    cfg = TrainConfig(**{**TINY, "steps": 60, "lr": 3e-3})
    params, norm, _ = train_policy(train, cfg)
    trained = TrainedPolicy(params, PolicySpec(STATE_DIM, ACTION_DIM, cfg.hidden), norm)
    untrained = TrainedPolicy(init_params(trained.spec, 0), trained.spec, norm)
    heldout = proxy_loss_on_source(trained, store, "target-toy", episodes=[20, 21])
    assert heldout < proxy_loss_on_source(untrained, store, "target-toy", episodes=[20, 21]) - 1.0
    direct = bc_loss(params, torch.from_numpy(norm.state(train.obs)), torch.from_numpy(norm.action(train.act)),
                     trained.spec).item()
    assert policy_proxy(trained, train.obs, train.act, batch_size=7) == pytest.approx(direct, rel=1e-5)
    mean, _ = policy_forward(params, torch.from_numpy(norm.state(train.obs)), trained.spec)
    mse = ((torch.tanh(mean) - torch.from_numpy(norm.action(train.act))) ** 2).sum(-1).mean().item()
    assert policy_proxy(trained, train.obs, train.act, "mse", batch_size=7) == pytest.approx(mse, rel=1e-5)
    assert (proxy_loss_on_source(trained, store, "target-toy", episodes=[20, 21], kind="mse")
            < proxy_loss_on_source(untrained, store, "target-toy", episodes=[20, 21], kind="mse"))
    with pytest.raises(ValueError, match="dims"):
        policy_proxy(trained, train.obs[:, :3], train.act)
    with pytest.raises(ValueError, match="proxy must be one of"):
        policy_proxy(trained, train.obs, train.act, "l1")


def test_device_is_how_a_run_computes_not_what(store_factory):
    store = store_factory()
    data = load_training_data(store, "target-toy", baseline_selection(store, "all"))
    cfg = TrainConfig(**TINY)
    assert cfg.device == "auto"
    p_auto, _, h_auto = train_policy(data, cfg)
    p_cpu, _, h_cpu = train_policy(data, TrainConfig(**{**TINY, "device": "cpu"}))
    assert all(v.device.type == "cpu" for v in p_auto.values())  # returned on the CPU whatever ran it
    if not torch.cuda.is_available():  # auto is the CPU here: the same run bit for bit
        assert h_auto == h_cpu and all(torch.equal(p_auto[k], p_cpu[k]) for k in p_cpu)
        with pytest.raises(ValueError, match="'cuda' was asked for but torch sees no CUDA device"):
            train_policy(data, TrainConfig(**{**TINY, "device": "cuda"}))
    else:  # a GPU run matches the CPU one up to float summation order
        for k in p_cpu:
            torch.testing.assert_close(p_auto[k], p_cpu[k], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match=r"TrainConfig.device must be one of \('auto', 'cpu', 'cuda'\)"):
        TrainConfig(device="gpu")
    # not in the fingerprint: a finished run is not retrained on another device, and a checkpoint resumes there
    m = train_to_store(store, "dev", data, TrainConfig(**{**TINY, "device": "cpu"}))
    assert "device" not in m.config
    assert store.is_done("policies/dev", "train", m.config, data.inputs)
    saved = {}
    train_policy(data, TrainConfig(**{**TINY, "device": "cpu"}), checkpoint_fn=lambda s: saved.setdefault(s["step"], s))
    p_res, _, _ = train_policy(data, cfg, resume_from=saved[10])
    for k in p_cpu:
        torch.testing.assert_close(p_res[k], p_cpu[k], rtol=1e-3, atol=1e-4)
