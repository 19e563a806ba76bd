"""Policy loss, mixture sampler, weighted co-training, checkpoints and resume (no Ray)."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from distcur.data import steps_key
from distcur.evaluate.proxy import proxy_loss_on_source
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
from distcur.policy.train import (
    TrainConfig,
    baseline_selection,
    load_training_data,
    train_policy,
    train_to_store,
)
from distcur.schema import SELECTION_SCHEMA, steps_table
from distcur.store import Store

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: threads only contend

STATE_DIM, ACTION_DIM = 5, 2
TINY = dict(hidden=(32, 32), batch_size=64, steps=30, checkpoint_every=10, log_every=5)


def make_episodes(source: str, n_episodes: int, length: int, seed: int, task: str = "toy") -> pa.Table:
    """Episodes of a smooth toy system whose action is a fixed function of the state."""
    rng = np.random.default_rng(seed)
    proj = np.random.default_rng(123).normal(size=(STATE_DIM, ACTION_DIM))
    cols = {k: [] for k in ("episode", "step", "state", "action", "is_first", "is_last", "is_terminal")}
    for e in range(n_episodes):
        s = rng.normal(size=(length, STATE_DIM))
        a = 0.9 * np.tanh(s @ proj * 0.5)
        cols["episode"] += [e] * length
        cols["step"] += list(range(length))
        cols["state"].append(s)
        cols["action"].append(a)
        cols["is_first"] += [i == 0 for i in range(length)]
        cols["is_last"] += [i == length - 1 for i in range(length)]
        cols["is_terminal"] += [False] * length
    cols["state"] = np.concatenate(cols["state"]).astype(np.float32)
    cols["action"] = np.concatenate(cols["action"]).astype(np.float32)
    return steps_table({**cols, "source": source, "task": [task] * len(cols["episode"])})


@pytest.fixture
def store_factory(tmp_path):
    """A store holding a target source and a prior source of toy episodes."""

    def build(n_target: int = 4, n_prior: int = 10, length: int = 20) -> Store:
        store = Store(tmp_path / "store")
        store.write_table(steps_key("target-toy"), make_episodes("target-toy", n_target, length, 1), stage="test")
        store.write_table(steps_key("prior"), make_episodes("prior", n_prior, length, 2), stage="test")
        return store

    return build


def selection(rows: list[tuple], source: str = "prior") -> pa.Table:
    return pa.table(
        {"source": [r[0] if len(r) == 4 else source for r in rows],
         "episode": [r[-3] for r in rows], "step": [r[-2] for r in rows], "weight": [r[-1] for r in rows]}
    ).cast(SELECTION_SCHEMA)


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


# -- data assembly and selection validation --------------------------------------------------


def test_load_training_data_joins_selection(store_factory):
    store = store_factory()
    sel = selection([(3, 5, 2.0), (0, 0, 1.0), (9, 19, 0.5)])
    data = load_training_data(store, "target-toy", sel)
    assert data.n_target == 80 and data.n_prior == 3
    np.testing.assert_allclose(data.prior_weight, [2.0, 1.0, 0.5])
    prior = store.read_table(steps_key("prior")).to_pandas()
    row = prior[(prior.episode == 9) & (prior.step == 19)].iloc[0]
    np.testing.assert_allclose(data.obs[80 + 2], row.state)
    np.testing.assert_allclose(data.act[80 + 2], row.action)
    assert set(data.inputs) == {"target", "selection", "prior:prior"}


@pytest.mark.parametrize(
    "rows, match",
    [
        ([(1, 0, 1.0), (42, 3, 1.0)], r"unknown \(source, episode, step\).*episode=42, step=3"),
        ([(1, 0, 1.0), (1, 20, 1.0)], r"unknown.*episode=1, step=20"),
        ([("nope", 1, 0, 1.0)], r"source 'nope'.*no committed step table"),
        ([(1, 0, 1.0), (1, 1, -0.5)], r"negative weights.*episode=1, step=1"),
        ([(1, 0, float("nan")), (1, 1, 1.0)], r"non-finite weights.*episode=1, step=0"),
        ([(1, 0, 1.0), (1, 0, 2.0)], r"duplicate rows.*episode=1, step=0"),
        ([], r"selection is empty"),
        ([(1, 0, 0.0)], r"only zero weights"),
    ],
)
def test_bad_selection_tables_raise_clear_errors(store_factory, rows, match):
    store = store_factory()
    with pytest.raises(ValueError, match=match):
        load_training_data(store, "target-toy", selection(rows))


def test_selection_missing_column_and_empty_allowed(store_factory):
    store = store_factory()
    with pytest.raises(ValueError, match=r"missing columns \['weight'\]"):
        load_training_data(store, "target-toy", pa.table({"source": ["prior"], "episode": [0], "step": [0]}))
    data = load_training_data(store, "target-toy", SELECTION_SCHEMA.empty_table(), allow_empty_selection=True)
    assert data.n_prior == 0 and data.n_target == 80
    with pytest.raises(FileNotFoundError, match="target-missing"):
        load_training_data(store, "target-missing", None)


def test_baseline_selections(store_factory):
    store = store_factory()
    assert baseline_selection(store, "target_only").num_rows == 0
    everything = baseline_selection(store, "all")
    assert everything.num_rows == 200 and everything.schema == SELECTION_SCHEMA
    assert set(everything.column("source").to_pylist()) == {"prior"}  # target-* sources excluded
    half = baseline_selection(store, "random", fraction=0.3, seed=5)
    assert len(set(half.column("episode").to_pylist())) == 3 and half.num_rows == 60
    assert half.equals(baseline_selection(store, "random", fraction=0.3, seed=5))
    with pytest.raises(ValueError, match="fraction"):
        baseline_selection(store, "random", fraction=0.0)


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


def test_train_to_store_checkpoints_load_weights_only_and_resume(store_factory):
    store = store_factory()
    data = load_training_data(store, "target-toy", baseline_selection(store, "random", fraction=0.5))
    cfg = TrainConfig(**TINY)

    class Crash(Exception):
        pass

    def crash_at_25(step):
        if step == 25:
            raise Crash

    with pytest.raises(Crash):
        train_to_store(store, "run1", data, cfg, on_step=crash_at_25)
    latest = ckpt.latest_checkpoint(store, "run1")
    assert latest["step"] == 20 and set(latest["adam"]) == {"m", "v", "t"}
    manifest = train_to_store(store, "run1", data, cfg)  # resumes at 20
    state = torch.load(store.path("policies/run1/policy.pt"), weights_only=True)
    assert state["step"] == 30 and "adam" not in state and manifest.files == ["policies/run1/policy.pt"]
    p_ref, n_ref, _ = train_policy(data, cfg)
    for k in p_ref:
        assert torch.equal(state["params"][k], p_ref[k])
    assert store.is_done("policies/run1", "train", manifest.config, data.inputs)
    train_to_store(store, "run1", data, cfg, on_step=crash_at_25)  # up to date: skipped, no crash

    policy = pickle.loads(pickle.dumps(TrainedPolicy.load(store, "run1")))
    obs = data.obs[:7]
    act = policy(obs)
    assert act.shape == (7, ACTION_DIM) and np.all(np.abs(act) <= 1)
    assert policy(obs[0]).shape == (ACTION_DIM,)
    with pytest.raises(FileNotFoundError, match="no policy checkpoint"):
        TrainedPolicy.load(store, "missing-run")


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


def test_cli_train_and_evaluate_proxy_only(store_factory, tmp_path):
    from distcur.cli import main

    store = store_factory()
    cfg_yaml = tmp_path / "train.yaml"
    cfg_yaml.write_text("hidden: [16, 16]\nbatch_size: 32\ncheckpoint_every: 5\nlog_every: 5\n")
    common = ["--store", store.uri, "--target", "target-toy", "--config", str(cfg_yaml), "--steps", "10"]
    assert main(["train", *common, "--selection", "random:0.5:3", "--out", "rand50"]) == 0
    assert main(["train", *common, "--selection", "none", "--out", "tonly"]) == 0
    state = ckpt.load_policy_state(store, "rand50")
    assert state["meta"]["data"]["n_prior"] == 100 and state["meta"]["config"]["hidden"] == [16, 16]
    assert ckpt.load_policy_state(store, "tonly")["meta"]["data"]["n_prior"] == 0
    assert main(["train", *common, "--selection", "missing-run", "--out", "x"]) == 2  # clear error, exit 2
    assert main(["evaluate", "rand50", "--task", "toy", "--store", store.uri, "--episodes", "0",
                 "--proxy-source", "target-toy", "--seeds", "0", "1", "--method", "random50"]) == 0
    table = store.read_table("evals/rand50").to_pylist()
    assert [r["seed"] for r in table] == [0, 1] and table[0]["method"] == "random50"
    assert math.isnan(table[0]["success"]) and np.isfinite(table[0]["proxy_loss"])
