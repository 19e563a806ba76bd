"""The evaluate stage: train-and-evaluate in one call (the demo's policy jobs), and the proxy's kind
named in every row it reports (``nll`` or ``mse``), through the stage and the CLI's ``--config``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from policy_factory import make_episodes, toy_store_factory

from distcur.cli import main
from distcur.data import steps_key
from distcur.policy.loaded import TrainedPolicy
from distcur.policy.train import TrainConfig, train_policy
from distcur.stages import evaluate
from distcur.stages.train import baseline_selection, load_training_data, train_to_store

torch.set_num_threads(1)

CFG = dict(hidden=(16, 16), batch_size=32, steps=20, checkpoint_every=0, log_every=5)


@pytest.fixture
def store(tmp_path):
    store = toy_store_factory(tmp_path)()
    store.write_table(steps_key("target-toy-heldout"), make_episodes("target-toy-heldout", 2, 20, 9), stage="test")
    store.write_table("selections/rand", baseline_selection(store, "random", fraction=0.5), stage="test")
    return store


def test_train_and_evaluate_trains_on_the_selection_and_scores_the_named_proxy(store):
    cfg = TrainConfig(**CFG, seed=3)
    row = evaluate.train_and_evaluate(store, "toy", "rand", cfg, "random50", episodes=0)
    assert (row["method"], row["task"], row["seed"], row["episodes"]) == ("random50", "toy", 3, 0)
    assert math.isnan(row["success"]) and row["selected_steps"] == 100 and row["proxy_kind"] == "nll"
    # the same policy trained here scores the same proxy on the held-out demos: nothing else went in
    data = load_training_data(store, "target-toy", store.read_table("selections/rand"))
    params, normalizer, history = train_policy(data, cfg)
    policy = TrainedPolicy(params, data.policy_spec(cfg.hidden), normalizer)
    assert row["proxy_loss"] == pytest.approx(evaluate.proxy_loss_on_source(policy, store, "target-toy-heldout"),
                                              rel=1e-6)
    assert row["final_train_loss"] == pytest.approx(history[-1]["loss"])
    mse = evaluate.train_and_evaluate(store, "toy", "rand", cfg, "random50", episodes=0, proxy_kind="mse")
    assert mse["proxy_kind"] == "mse" and mse["proxy_loss"] == pytest.approx(
        evaluate.proxy_loss_on_source(policy, store, "target-toy-heldout", kind="mse"), rel=1e-6)
    reports = []
    every = TrainConfig(**{**CFG, "checkpoint_every": 10}, seed=3)  # the same run, its checkpoints' proxies reported
    again = evaluate.train_and_evaluate(store, "toy", "rand", every, "random50", 0, on_checkpoint=lambda *r: reports.append(r))
    assert [s for s, _ in reports] == [10, 20] and reports[-1][1] == pytest.approx(row["proxy_loss"], rel=1e-6)
    assert again["proxy_loss"] == pytest.approx(row["proxy_loss"], rel=1e-6)
    target_only = evaluate.train_and_evaluate(store, "toy", None, TrainConfig(**CFG, alpha=1.0), "target_only", 0)
    assert target_only["selected_steps"] == 0 and np.isfinite(target_only["proxy_loss"])


def test_every_row_names_its_proxy_kind(store, tmp_path, capsys):
    data = load_training_data(store, "target-toy", None)
    train_to_store(store, "pol", data, TrainConfig(**CFG))
    key, rows = evaluate.run(store, evaluate.EvaluateConfig(episodes=0, seeds=(0, 1), proxy="mse"), "pol", "toy")
    assert "PROXY-ONLY evaluation, no simulator for task 'toy'" in capsys.readouterr().out
    assert [r["proxy_kind"] for r in rows] == ["mse", "mse"] and rows[0]["proxy_source"] == "target-toy-heldout"
    table = store.read_table(key).to_pylist()
    assert {r["proxy_kind"] for r in table} == {"mse"}
    # the CLI: --config YAML for the rest, the flag winning over it
    cfg = tmp_path / "evaluate.yaml"
    cfg.write_text("episodes: 0\nseeds: [4]\nproxy: mse\nmethod: from-yaml\n")
    assert main(["evaluate", "pol", "--task", "toy", "--store", store.uri, "--config", str(cfg), "--proxy", "nll",
                 "--out", "cli"]) == 0
    rows = store.read_table("evals/cli").to_pylist()
    assert [(r["method"], r["seed"], r["proxy_kind"]) for r in rows] == [("from-yaml", 4, "nll")]
    assert "loss is the BC loss (nll) on target-toy-heldout" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):  # argparse's choices, named in its error line
        main(["evaluate", "pol", "--task", "toy", "--store", store.uri, "--episodes", "0", "--proxy", "l1"])
    assert "argument --proxy: invalid choice: 'l1'" in capsys.readouterr().err
    cfg.write_text("episodes: -1\n")
    assert main(["evaluate", "pol", "--task", "toy", "--store", store.uri, "--config", str(cfg)]) == 2
