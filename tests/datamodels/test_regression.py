"""Linear datamodels: recovery of a known tau, the LDS, clusters, subsets, target split."""

from __future__ import annotations

import numpy as np
import pytest

from distcur.clusters import cluster_ids
from distcur.data import StepArrays
from distcur.datamodels.proxy import split_target
from distcur.datamodels.regression import fit_linear_datamodel, linear_datamodeling_score, tau_reliability
from distcur.datamodels.subsets import masks_from_table, masks_table, subset_mask, subset_masks


def _linear_world(m, c=40, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    tau = np.zeros(c)
    support = rng.choice(c, 8, replace=False)
    tau[support] = rng.normal(0, 0.5, 8)
    masks = subset_masks(range(m), c, 0.5, seed)
    y = 1.5 + masks @ tau + noise * rng.normal(size=m)
    return tau, masks, y


@pytest.mark.parametrize("penalty", ["lasso", "ridge", "auto"])
def test_regression_recovers_known_tau(penalty):
    tau, masks, y = _linear_world(400)
    fit = fit_linear_datamodel(masks, y, penalty=penalty, cv_folds=5)
    assert fit.penalty in ("lasso", "ridge") and (penalty == "auto" or fit.penalty == penalty)
    assert np.corrcoef(fit.tau, tau)[0, 1] > 0.99
    assert np.abs(fit.tau - tau).max() < 0.05
    assert fit.bias == pytest.approx(1.5, abs=0.05)
    _, fresh, y_fresh = _linear_world(100, seed=1)
    fresh = subset_masks(range(1000, 1100), 40, 0.5, 0)
    y_fresh = 1.5 + fresh @ tau
    assert linear_datamodeling_score(fit, fresh, y_fresh) > 0.95


def test_lasso_is_sparse_and_lds_drops_on_noise():
    tau, masks, y = _linear_world(300)
    fit = fit_linear_datamodel(masks, y, penalty="lasso")
    assert np.sum(np.abs(fit.tau) > 1e-3) <= 20
    rng = np.random.default_rng(5)
    noise_fit = fit_linear_datamodel(masks, rng.normal(size=len(y)), penalty="ridge")
    fresh = subset_masks(range(500, 600), 40, 0.5, 0)
    assert abs(linear_datamodeling_score(noise_fit, fresh, 1.5 + fresh @ tau)) < 0.4


def test_tau_reliability_grows_with_models_and_is_zero_on_noise():
    rng = np.random.default_rng(3)
    c = 60
    tau = rng.normal(0, 0.05, c)  # many small effects, as episode clusters of a prior

    def world(m):
        masks = subset_masks(range(m), c, 0.5, 1)
        return masks, masks @ tau + 0.2 * rng.normal(size=m)

    few = tau_reliability(*world(48), penalty="ridge")
    many = tau_reliability(*world(2000), penalty="ridge")
    assert many["split_half_spearman"] > 0.8 and many["top_overlap"] >= 0.6
    assert few["split_half_spearman"] < many["split_half_spearman"] - 0.3
    masks, _ = world(400)
    noise = tau_reliability(masks, rng.normal(size=400), penalty="ridge")
    assert abs(noise["split_half_spearman"]) < 0.3
    with pytest.raises(ValueError, match="at least 8 models"):
        tau_reliability(masks[:6], np.zeros(6))


def test_regression_input_errors():
    with pytest.raises(ValueError, match="penalty"):
        fit_linear_datamodel(np.zeros((10, 3)), np.zeros(10), penalty="l0")
    with pytest.raises(ValueError, match="not finite"):
        fit_linear_datamodel(np.zeros((10, 3)), np.full(10, np.nan))
    with pytest.raises(ValueError, match="expected masks"):
        fit_linear_datamodel(np.zeros((10, 3)), np.zeros(9))


def test_subset_masks_are_pure_and_round_trip():
    m = subset_masks(np.arange(6), 13, 0.5, seed=4)
    np.testing.assert_array_equal(m[2], subset_mask(2, 13, 0.5, seed=4))
    models, splits, back = masks_from_table(masks_table(np.arange(6), ["train"] * 4 + ["heldout"] * 2, m), 13)
    np.testing.assert_array_equal(back, m)
    assert list(splits) == ["train"] * 4 + ["heldout"] * 2 and list(models) == list(range(6))
    with pytest.raises(ValueError, match="keep_prob"):
        subset_mask(0, 3, 1.0, 0)


def _steps(lengths, sources=None, tasks=None):
    n = sum(lengths)
    src = np.concatenate([[s] * L for s, L in zip(sources or ["a"] * len(lengths), lengths)]).astype(object)
    task = np.concatenate([[t] * L for t, L in zip(tasks or ["t"] * len(lengths), lengths)]).astype(object)
    ep = np.concatenate([[i] * L for i, L in enumerate(lengths)])
    st = np.concatenate([np.arange(L) for L in lengths]).astype(np.int32)
    return StepArrays(source=src, episode=ep, step=st, task=task, state=np.zeros((n, 2), np.float32),
                      action=np.zeros((n, 1), np.float32), success=np.zeros(n, bool), is_first=st == 0,
                      is_last=np.zeros(n, bool))


def test_cluster_levels():
    s = _steps([5, 3, 4], sources=["a", "a", "b"], tasks=["x", "y", "x"])
    assert cluster_ids(s, "step").n_clusters == 12
    ep = cluster_ids(s, "episode")
    assert list(ep.ids) == [0] * 5 + [1] * 3 + [2] * 4 and list(ep.keys) == ["a/0", "a/1", "b/2"]
    sub = cluster_ids(s, "subtraj", horizon=2)
    assert list(sub.ids) == [0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 6]
    assert list(sub.sizes()) == [2, 2, 1, 2, 1, 2, 2]
    assert list(cluster_ids(s, "task").keys) == ["x", "y"]
    assert cluster_ids(s, "source").n_clusters == 2
    with pytest.raises(ValueError, match="cluster level"):
        cluster_ids(s, "trajectory")
    with pytest.raises(ValueError, match="horizon"):
        cluster_ids(s, "subtraj", horizon=0)


def test_datamodel_and_selection_clusters_are_one_partition():
    # the datamodel numbers clusters by first appearance, selection by key; the partition is the same
    from distcur.select import cluster_scores

    rng = np.random.default_rng(3)
    s = _steps([7, 4, 9, 5], sources=["b", "a", "b", "a"], tasks=["x", "y", "x", "y"])
    perm = rng.permutation(len(s))
    s = type(s)(**{k: v[perm] for k, v in vars(s).items()})
    code = np.unique(s.source.astype(str), return_inverse=True)[1]
    for level in ("step", "subtraj", "episode"):
        dm = cluster_ids(s, level, horizon=3)
        sel, _ = cluster_scores(code, s.episode, s.step, np.zeros(len(s)), level, 3)
        pairs = set(zip(dm.ids.tolist(), sel.tolist()))
        assert len(pairs) == dm.n_clusters == len(set(sel.tolist())), level
        assert dm.ids[0] == 0 and list(dm.keys).index(f"{s.source[0]}/{s.episode[0]}" + (
            f"/{s.step[0]}" if level == "step" else f"/h{s.step[0] // 3}" if level == "subtraj" else "")) == 0


def test_split_target_halves_by_episode():
    t = _steps([4, 4, 4, 4, 4])
    split = split_target(t, seed=1)
    inj, prx = set(split.inject.episode), set(split.proxy.episode)
    assert len(inj) == 3 and len(prx) == 2 and not inj & prx
    with pytest.raises(ValueError, match="at least 2"):
        split_target(_steps([4]))
