"""Meta-gradients through Adam: finite differences, checkpointing, and the DataMIL estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distcur.datamodels.metagrad import (
    MetagradRunConfig,
    _candidate_halves,
    datamil_metagrad_scores,
    sqrt_checkpoint_every,
    weight_meta_gradient,
)
from distcur.datamodels.proxy import make_proxy_fn
from distcur.policy.functional import (
    AdamConfig,
    PolicySpec,
    adam_init,
    init_params,
    make_train_step,
    policy_forward,
)

DT = torch.float64
SPEC = PolicySpec(5, 2, (8, 8))
ADAM = AdamConfig(lr=1e-2)
G = 4


def _problem(k_steps: int = 6, batch: int = 16, seed: int = 0, proxy_kind: str = "nll"):
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        return torch.randn(n, 5, generator=g, dtype=DT), torch.tanh(torch.randn(n, 2, generator=g, dtype=DT))

    batches = [(*draw(batch), torch.randint(-1, G, (batch,), generator=g)) for _ in range(k_steps)]
    proxy_obs, proxy_act = draw(32)
    proxy = make_proxy_fn(SPEC, proxy_obs, proxy_act, proxy_kind)
    # Warm Adam state (as after DataMIL's T - K forward steps): second moments are positive.
    params, opt = init_params(SPEC, 0, DT), None
    opt = adam_init(params)
    step = make_train_step(SPEC, ADAM, "batch")
    for _ in range(5):
        obs, act = draw(batch)
        params, opt, _ = step(params, opt, obs, act, torch.ones(batch, dtype=DT))
    return params, opt, batches, proxy


@pytest.mark.parametrize("proxy_kind", ["nll", "mse"])
def test_meta_gradient_matches_central_finite_differences(proxy_kind):
    params, opt, batches, proxy = _problem(proxy_kind=proxy_kind)
    w = torch.tensor([1.0, 0.5, 0.0, 1.2], dtype=DT)
    value, dw, final = weight_meta_gradient(params, opt, SPEC, ADAM, batches, w, proxy)
    assert dw.shape == (G,) and np.isfinite(value)
    assert value == pytest.approx(float(proxy(final)))

    def f(wv):
        return weight_meta_gradient(params, opt, SPEC, ADAM, batches, wv, proxy)[0]

    eps = 1e-6
    fd = torch.tensor([(f(w + eps * e) - f(w - eps * e)) / (2 * eps) for e in torch.eye(G, dtype=DT)], dtype=DT)
    rel = float((dw - fd).norm() / fd.norm())
    assert rel < 1e-3, (dw, fd)
    assert torch.all(dw != 0)


@pytest.mark.parametrize("every", [1, 2, 4, sqrt_checkpoint_every(9)])
def test_checkpointing_equals_no_checkpointing(every):
    params, opt, batches, proxy = _problem(k_steps=9)
    w = torch.tensor([1.0, 0.0, 0.7, 1.0], dtype=DT)
    v0, g0, p0 = weight_meta_gradient(params, opt, SPEC, ADAM, batches, w, proxy, checkpoint_every=None)
    v1, g1, p1 = weight_meta_gradient(params, opt, SPEC, ADAM, batches, w, proxy, checkpoint_every=every)
    assert v0 == pytest.approx(v1, rel=1e-12)
    torch.testing.assert_close(g0, g1, rtol=1e-10, atol=1e-14)
    for k in p0:
        torch.testing.assert_close(p0[k], p1[k], rtol=0, atol=0)


def test_final_params_equal_plain_training_and_inputs_untouched():
    params, opt, batches, proxy = _problem(k_steps=4)
    before = {k: v.clone() for k, v in params.items()}
    w = torch.tensor([0.3, 1.0, 2.0, 1.0], dtype=DT)
    _, _, final = weight_meta_gradient(params, opt, SPEC, ADAM, batches, w, proxy, checkpoint_every=2)
    step = make_train_step(SPEC, ADAM, "batch")
    p, o = params, opt
    for obs, act, group in batches:
        weights = torch.where(group >= 0, w[group.clamp_min(0)], torch.ones((), dtype=DT))
        p, o, _ = step(p, o, obs, act, weights)
    for k in p:
        torch.testing.assert_close(final[k], p[k])
        assert torch.equal(params[k], before[k])


def test_groups_absent_from_every_batch_get_zero_gradient():
    params, opt, batches, proxy = _problem(k_steps=3)
    batches = [(o, a, torch.where(g == 3, torch.full_like(g, -1), g)) for o, a, g in batches]
    _, dw, _ = weight_meta_gradient(params, opt, SPEC, ADAM, batches, torch.ones(G, dtype=DT), proxy)
    assert dw[3] == 0 and torch.all(dw[:3] != 0)


def test_rejects_group_out_of_range():
    params, opt, batches, proxy = _problem(k_steps=2)
    with pytest.raises(ValueError, match="group"):
        weight_meta_gradient(params, opt, SPEC, ADAM, batches, torch.ones(2, dtype=DT), proxy)


def test_candidate_halves_cover_every_cluster_equally():
    cfg = MetagradRunConfig(total_steps=10, meta_steps=2, iterations=6, seed=3)
    halves = np.stack(_candidate_halves(11, cfg))
    assert np.all(halves.sum(0) == 3)


def test_datamil_scores_rank_helpful_clusters_first():
    """Prior clusters that demonstrate the target's behaviour get a negative meta-gradient
    (up-weighting them lowers the proxy loss); those demonstrating the opposite, positive."""
    rng = np.random.default_rng(0)
    ds, da, per = 6, 2, 30
    a_true = rng.normal(size=(da, ds)) / np.sqrt(ds)
    n_clusters = 16
    good = np.arange(n_clusters) % 2 == 0

    def demos(n, sign):
        s = rng.normal(size=(n, ds))
        return s, np.tanh(sign * 2 * s @ a_true.T + 0.05 * rng.normal(size=(n, da)))

    obs, act, cluster = [], [], []
    for c in range(n_clusters):
        s, a = demos(per, 1.0 if good[c] else -1.0)
        obs.append(s), act.append(a), cluster.append(np.full(per, c))
    s, a = demos(60, 1.0)  # injected target half
    obs.append(s), act.append(a), cluster.append(np.full(60, -1))
    proxy_obs, proxy_act = demos(60, 1.0)
    spec = PolicySpec(ds, da, (32, 32))
    to32 = lambda x: torch.as_tensor(np.concatenate(x) if isinstance(x, list) else x, dtype=torch.float32)  # noqa: E731
    cfg = MetagradRunConfig(total_steps=120, meta_steps=16, iterations=4, batch_size=64, seed=1)
    proxy = make_proxy_fn(spec, to32(proxy_obs), to32(proxy_act))
    grads, counts = datamil_metagrad_scores(
        spec, AdamConfig(lr=3e-3), to32(obs), to32(act), torch.as_tensor(np.concatenate(cluster)), n_clusters, proxy, cfg
    )
    assert np.all(counts == 2)
    assert np.median(grads[good]) < 0 < np.median(grads[~good])
    auc = np.mean(grads[good][:, None] < grads[~good][None, :])  # P(good ranks above bad)
    assert auc >= 0.75, (grads[good], grads[~good])


def test_mse_proxy_is_the_executed_actions_squared_error():
    params = init_params(SPEC, 1, DT)
    g = torch.Generator().manual_seed(2)
    obs, act = torch.randn(20, 5, generator=g, dtype=DT), torch.tanh(torch.randn(20, 2, generator=g, dtype=DT))
    mean, _ = policy_forward(params, obs, SPEC)
    want = ((torch.tanh(mean) - act) ** 2).sum(-1).mean()
    assert float(make_proxy_fn(SPEC, obs, act, "mse")(params)) == pytest.approx(float(want), rel=1e-12)
    # Blind to the predicted std: the NLL moves with the log-std head, the executed-action error does not.
    wide = {**params, "log_std.b": params["log_std.b"] + 1.0}
    assert float(make_proxy_fn(SPEC, obs, act, "mse")(wide)) == pytest.approx(float(want), rel=1e-12)
    assert float(make_proxy_fn(SPEC, obs, act, "nll")(wide)) != pytest.approx(float(make_proxy_fn(SPEC, obs, act)(params)))
    with pytest.raises(ValueError, match="proxy must be one of"):
        make_proxy_fn(SPEC, obs, act, "l1")
