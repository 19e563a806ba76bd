"""Measured criteria on the 2-D imbalanced-behaviour set (known answer: distcur.rebalance.toy2d).

The frequent behaviour has 10x the samples of the rare one and their states overlap. Uniform BC
must imitate the frequent behaviour on the rare behaviour's own states (large action error
there); every rebalancing must recover the rare behaviour (small error). Thresholds sit between
the closed-form optima: uniform-BC optimum ~0.67, balanced optimum ~0.27 (mean L2 action error
on the rare states, actions of norm ~0.6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distcur.policy.functional import PolicySpec
from distcur.policy.train import train_weighted_bc
from distcur.rebalance.dro import DROConfig, dro_rebalance
from distcur.rebalance.frequency import frequency_weights
from distcur.rebalance.group import alpha_to_sample_weights, groups_from_labels
from distcur.rebalance.metagrad import MetaGradConfig, metagrad_rebalance
from distcur.rebalance.toy2d import action_errors, bayes_errors, make_toy2d

SPEC = PolicySpec(2, 2, (32, 32))
STEPS, BATCH, LR = 300, 128, 3e-3
RARE_RECOVERED = 0.40  # rebalanced policies must get below this rare-action error
RARE_IGNORED = 0.50  # uniform BC must stay above it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; small nets gain nothing from more threads
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    data = make_toy2d(n_frequent=1000, ratio=10.0, seed=0)
    return data, groups_from_labels(data.behaviour)


@pytest.fixture(scope="module")
def uniform_errors(toy):
    data, _ = toy
    params = train_weighted_bc(data.state, data.action, None, SPEC, STEPS, BATCH, LR, seed=0)
    return action_errors(params, SPEC)


def test_dataset_is_imbalanced_with_a_known_answer(toy):
    data, groups = toy
    assert groups.names == ["frequent", "rare"]
    assert groups.counts().tolist() == [1000, 100]
    imbalanced = bayes_errors(np.array([10 / 11, 1 / 11]))
    balanced = bayes_errors(np.array([0.5, 0.5]))
    assert imbalanced["rare"] > 0.6 and imbalanced["frequent"] < 0.1
    assert balanced["rare"] < 0.3 and abs(balanced["rare"] - balanced["frequent"]) < 0.03


def test_uniform_bc_imitates_the_frequent_behaviour(uniform_errors):
    assert uniform_errors["frequent"] < 0.15, uniform_errors
    assert uniform_errors["rare"] > RARE_IGNORED, uniform_errors


def test_frequency_weighting_recovers_the_rare_behaviour(toy, uniform_errors):
    data, groups = toy
    w = frequency_weights(groups.group, groups.k)
    params = train_weighted_bc(data.state, data.action, w, SPEC, STEPS, BATCH, LR, seed=0)
    err = action_errors(params, SPEC)
    assert err["rare"] < RARE_RECOVERED and err["rare"] < 0.6 * uniform_errors["rare"], (err, uniform_errors)


def test_dro_recovers_the_rare_behaviour(toy, uniform_errors):
    data, groups = toy
    cfg = DROConfig(steps=200, reference_steps=200, batch_size=BATCH, lr=LR)
    res = dro_rebalance(data.state, data.action, groups.group, groups.k, SPEC, cfg, seed=0)
    assert res.alpha[1] > 0.35, res.alpha  # the rare group's data share is 1/11 = 0.09
    assert bayes_errors(res.alpha)["rare"] < RARE_RECOVERED
    err = action_errors(res.proxy_params, SPEC)
    assert err["rare"] < RARE_RECOVERED and err["rare"] < 0.6 * uniform_errors["rare"], (err, uniform_errors)


def test_metagrad_discovers_the_rebalancing_from_the_data_shares(toy, uniform_errors):
    data, groups = toy
    cfg = MetaGradConfig(init="data", outer_steps=6, inner_steps=8, warmup_steps=150, lr=LR, meta_lr=1.0)
    res = metagrad_rebalance(data.state, data.action, groups.group, groups.k, SPEC, cfg, seed=0,
                             episode=data.episode)
    assert res.history[0][1] == pytest.approx(100 / 1100, abs=0.02)  # starts as uniform BC
    assert res.alpha[1] > 0.35, res.history
    assert res.objective[-1] < res.objective[0], res.objective  # the balanced validation loss fell
    assert bayes_errors(res.alpha)["rare"] < RARE_RECOVERED
    err = action_errors(res.params, SPEC)
    assert err["rare"] < RARE_RECOVERED and err["rare"] < 0.6 * uniform_errors["rare"], (err, uniform_errors)


def test_with_mislabelled_demos_metagrad_on_trusted_groups_beats_frequency_and_dro():
    # A third group as large as the rare one: rare states, frequent actions (bad teleoperation).
    # Frequency gives it a third of the data and DRO more (its loss stays high), both at the rare
    # behaviour's expense; the meta-gradient, judging weights by the trusted groups' validation
    # loss, starves it. The measured criterion: the weight it gets and the rare behaviour's error.
    data = make_toy2d(n_frequent=1000, ratio=10.0, seed=0, n_corrupt=100)
    groups = groups_from_labels(data.behaviour)
    assert groups.names == ["corrupt", "frequent", "rare"]
    trusted = (1, 2)
    dro = dro_rebalance(data.state, data.action, groups.group, groups.k, SPEC,
                        DROConfig(steps=200, reference_steps=200, batch_size=BATCH, lr=LR), seed=0)
    cfg = MetaGradConfig(init="uniform", outer_steps=8, inner_steps=10, warmup_steps=200, lr=LR, meta_lr=1.0,
                         objective_groups=trusted)
    mg = metagrad_rebalance(data.state, data.action, groups.group, groups.k, SPEC, cfg, seed=0, episode=data.episode)
    assert mg.alpha[0] < 0.15 and mg.alpha[0] < 0.6 * dro.alpha[0], (mg.alpha, dro.alpha)
    errs = {}
    for name, w in (("frequency", frequency_weights(groups.group, groups.k)),
                    ("dro", alpha_to_sample_weights(groups.group, dro.alpha)),
                    ("metagrad", alpha_to_sample_weights(groups.group, mg.alpha))):
        params = train_weighted_bc(data.state, data.action, w, SPEC, STEPS, BATCH, LR, seed=0)
        errs[name] = action_errors(params, SPEC)
    balanced = {k: (e["rare"] + e["frequent"]) / 2 for k, e in errs.items()}
    assert balanced["metagrad"] < 0.85 * min(balanced["frequency"], balanced["dro"]), errs
    with pytest.raises(ValueError, match="objective_groups"):
        metagrad_rebalance(data.state, data.action, groups.group, groups.k, SPEC,
                           MetaGradConfig(outer_steps=1, inner_steps=2, objective_groups=(5,)))
