"""Meta-gradients through Adam: finite differences, checkpointing, and the DataMIL estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distcur.datamodels.metagrad import (
    MetagradRunConfig,
    _candidate_halves,
    datamil_metagrad_scores,
    datamil_reference_scores,
    reference_iteration_batches,
    round_pools,
    sqrt_checkpoint_every,
    update_pool,
    weight_meta_gradient,
)
from distcur.policy.functional import (
    AdamConfig,
    PolicySpec,
    adam_init,
    init_params,
    lr_schedule,
    make_train_step,
    policy_forward,
)
from distcur.policy.proxy import make_proxy_fn

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


def _opposed_clusters(n_clusters: int = 16, inject: int = 60):
    """(spec, obs, act, cluster, proxy_fn, good): even clusters demonstrate the target's
    behaviour, odd ones its opposite; ``inject`` target rows join with cluster -1."""
    rng = np.random.default_rng(0)
    ds, da, per = 6, 2, 30
    a_true = rng.normal(size=(da, ds)) / np.sqrt(ds)
    good = np.arange(n_clusters) % 2 == 0

    def demos(n, sign):
        s = rng.normal(size=(n, ds))
        return s, np.tanh(sign * 2 * s @ a_true.T + 0.05 * rng.normal(size=(n, da)))

    obs, act, cluster = [], [], []
    for c in range(n_clusters):
        s, a = demos(per, 1.0 if good[c] else -1.0)
        obs.append(s), act.append(a), cluster.append(np.full(per, c))
    s, a = demos(inject, 1.0)  # injected target half
    obs.append(s), act.append(a), cluster.append(np.full(inject, -1))
    proxy_obs, proxy_act = demos(60, 1.0)
    spec = PolicySpec(ds, da, (32, 32))
    to32 = lambda x: torch.as_tensor(np.concatenate(x) if isinstance(x, list) else x, dtype=torch.float32)  # noqa: E731
    proxy = make_proxy_fn(spec, to32(proxy_obs), to32(proxy_act))
    return spec, to32(obs), to32(act), torch.as_tensor(np.concatenate(cluster)), proxy, good


def test_datamil_scores_rank_helpful_clusters_first():
    """Prior clusters that demonstrate the target's behaviour get a negative meta-gradient
    (up-weighting them lowers the proxy loss); those demonstrating the opposite, positive."""
    spec, obs, act, cluster, proxy, good = _opposed_clusters()
    n_clusters = len(good)
    cfg = MetagradRunConfig(total_steps=120, meta_steps=16, iterations=4, batch_size=64, seed=1)
    grads, counts = datamil_metagrad_scores(spec, AdamConfig(lr=3e-3), obs, act, cluster, n_clusters, proxy, cfg)
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


def test_lr_schedule_warms_up_then_decays():
    lr = lr_schedule(1.0, 10, "linear", 2)
    np.testing.assert_allclose(lr[:3], [0.5, 1.0, 1.0])
    assert np.all(np.diff(lr[2:]) < 0) and lr[-1] == pytest.approx(1 / 8)
    np.testing.assert_allclose(lr_schedule(0.1, 4), 0.1)
    assert lr_schedule(1.0, 9, "cosine")[0] == 1.0 and np.all(np.diff(lr_schedule(1.0, 9, "cosine")) < 0)
    with pytest.raises(ValueError, match="lr schedule"):
        lr_schedule(1.0, 4, "step")


@pytest.mark.parametrize("chunk_rows", [None, 16])
def test_reference_special_batch_meta_gradient_matches_finite_differences(chunk_rows):
    """The reference recipe's differentiated steps (the special batch of all candidate rows at
    weight 0, then normal pool batches, summed losses, a decaying learning rate) from a warm
    Adam state: d proxy / d w agrees with central differences of the proxy, and computing the
    special batch in chunks of 16 rows changes nothing."""
    g = torch.Generator().manual_seed(3)
    n = 60
    obs, act = torch.randn(n, 5, generator=g, dtype=DT), torch.tanh(torch.randn(n, 2, generator=g, dtype=DT))
    cluster = np.repeat(np.arange(G), n // G)
    # Batches of 32 of the 45 pool rows: a ReLU unit silent on every forward batch but active on a
    # candidate row has Adam second moment 0, where the update is not smooth in w at w = 0 (slope
    # ~ 1 / eps); with 8-row batches that happened here and central differences disagreed.
    cfg = MetagradRunConfig(total_steps=9, meta_steps=4, iterations=1, batch_size=32, lr_schedule="linear",
                            warmup_steps=2)
    candidates = np.array([True, False, True, True])
    fwd, meta = reference_iteration_batches(obs, act, cluster, np.array([True, True, False, True]), candidates,
                                            cfg, seed=5)
    assert len(fwd) == 5 and len(meta) == 4 and len(meta[0][0]) == 45  # 3 candidate clusters x 15 rows
    assert torch.all(meta[1][2] == -1) and not np.isin(cluster[np.concatenate(fwd)], [2]).any()
    lrs = cfg.lrs(1e-2)
    params, opt = init_params(SPEC, 0, DT), adam_init(init_params(SPEC, 0, DT))
    for b, lr in zip(fwd, lrs[:5]):
        step = make_train_step(SPEC, AdamConfig(lr=float(lr)), "sum")
        params, opt, _ = step(params, opt, obs[b], act[b], torch.ones(len(b), dtype=DT))
    proxy_obs, proxy_act = torch.randn(16, 5, generator=g, dtype=DT), torch.tanh(torch.randn(16, 2, generator=g, dtype=DT))
    proxy = make_proxy_fn(SPEC, proxy_obs, proxy_act, "mse")

    def f(w, rows=chunk_rows):
        return weight_meta_gradient(params, opt, SPEC, ADAM, meta, w, proxy, 2, "sum", lrs[5:], rows)

    w0 = torch.zeros(G, dtype=DT)
    value, dw, final = f(w0)
    whole = f(w0, None)
    assert value == pytest.approx(whole[0], rel=1e-12)
    torch.testing.assert_close(dw, whole[1], rtol=1e-9, atol=1e-12)
    for k in final:
        torch.testing.assert_close(final[k], whole[2][k], rtol=1e-12, atol=1e-14)
    eps = 1e-6
    fd = torch.tensor([(f(w0 + eps * e)[0] - f(w0 - eps * e)[0]) / (2 * eps) for e in torch.eye(G, dtype=DT)], dtype=DT)
    assert dw[1] == 0 and torch.all(dw[candidates] != 0)
    assert float((dw - fd).norm() / fd.norm()) < 1e-3, (dw, fd)


def test_update_pool_moves_only_scored_clusters_by_percentile():
    pool = np.array([True, True, False, False, True, True])
    scores = np.array([-3.0, 0.0, -1.0, 2.0, 5.0, 1.0])  # cluster 1 unscored
    new = update_pool(pool, scores, (20.0, 80.0))
    # non-zero scores -3, -1, 1, 2, 5: 20th percentile -1.4, 80th 2.6
    np.testing.assert_array_equal(new, [True, True, False, False, False, True])
    np.testing.assert_array_equal(update_pool(pool, scores, (50.0, 50.0)), [True, True, True, False, False, True])
    np.testing.assert_array_equal(update_pool(pool, np.zeros(6)), pool)


@pytest.mark.parametrize(("inject", "chunk_rows"), [(60, None), (0, 100)])
def test_reference_recipe_ranks_helpful_clusters_and_shapes_the_pool(inject, chunk_rows):
    """With and without injected target rows (and with the special batch in chunks): helpful
    clusters get negative mean scores, and the pool loses clusters that demonstrate the opposite
    behaviour."""
    spec, obs, act, cluster, proxy, good = _opposed_clusters(inject=inject)
    cfg = MetagradRunConfig(total_steps=60, meta_steps=8, iterations=6, batch_size=64, seed=1, recipe="datamil",
                            lr_schedule="linear", warmup_steps=3, chunk_rows=chunk_rows)
    score, count, pool_sizes = datamil_reference_scores(spec, AdamConfig(lr=5e-3), obs, act, cluster, len(good),
                                                        proxy, cfg)
    assert len(pool_sizes) == 6 and count.sum() == 6 * 8 and np.all(score[count == 0] == 0)
    auc = np.mean(score[good][:, None] < score[~good][None, :])
    assert auc >= 0.8, (score[good], score[~good])
    assert pool_sizes[-1] < len(good)


def test_round_pools_move_the_pool_once_per_round():
    """Round size 1 is the reference's sequence (each iteration sees every earlier move); with 2,
    both iterations of a round train on the pool the earlier rounds left, and the moves are the
    same ones applied in the same order."""
    cfg = MetagradRunConfig(total_steps=10, meta_steps=2, iterations=4, recipe="datamil")
    scores = [np.array([-3.0, 0.0, 1.0, 5.0, 2.0]), np.array([0.0, -2.0, 4.0, 1.0, -1.0]),
              np.array([1.0, 2.0, 0.0, -4.0, 3.0]), np.array([-1.0, 0.0, 2.0, 0.0, 1.0])]
    serial = [np.ones(5, bool)]
    for sc in scores:
        serial.append(update_pool(serial[-1], sc))
    pools1, sizes1 = round_pools(scores, 5, cfg, 1)
    pools2, sizes2 = round_pools(scores, 5, cfg, 2)
    for i in range(4):
        np.testing.assert_array_equal(pools1[i], serial[i])
    for i, j in ((0, 0), (1, 0), (2, 2), (3, 2)):
        np.testing.assert_array_equal(pools2[i], serial[j])
    assert sizes1 == sizes2 == [int(p.sum()) for p in serial[1:]]
    assert len(round_pools(scores[:1], 5, cfg, 2)[0]) == 2  # round 1's pool needs all of round 0
    with pytest.raises(ValueError, match="round_size"):
        round_pools(scores, 5, cfg, 0)
