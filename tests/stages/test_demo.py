"""``distcur demo`` end to end at toy size: every stage for real (MetaWorld, Ray, VAE, KDE,
datamodels, co-training, rollouts), checked for what it must produce, and resumed for free."""

import dataclasses
import json

import numpy as np
import pytest

from distcur.policy.train import TrainConfig
from distcur.stages.demo import DemoConfig, DemoEvaluation, job_key, run_demo
from distcur.stages.report import build_report
from distcur.stats import success_summary
from distcur.store import Store

TINY = dict(
    seeds=(0,), evaluation=DemoEvaluation(episodes=2, max_steps=40, heldout_demos=2),
    train=TrainConfig(steps=30, hidden=(32, 32), checkpoint_every=0), vae={"train_steps": 50, "hidden": (32,)},
    prior={"tasks": ("reach-v3", "pick-place-v3"), "success_per_task": 2, "failed_per_task": 2,
           "failed_max_steps": 40, "max_steps": 150},
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_session):
    store = str(tmp_path_factory.mktemp("demo-store"))
    datamodel = {"hidden": (16, 16), "regression": {"num_models": 8, "heldout_models": 4, "steps": 20,
                                                    "models_per_batch": 8},
                 "metagrad": {"total_steps": 20, "meta_steps": 5, "iterations": 2}}
    cfg = DemoConfig(store=store, **TINY, datamodel=datamodel)
    return cfg, run_demo(cfg)


def test_every_method_trained_and_evaluated(demo_run):
    cfg, table = demo_run
    assert sorted(set(table.column("method").to_pylist())) == sorted(cfg.methods)
    success = np.asarray(table.column("success").to_pylist())
    assert ((0 <= success) & (success <= 1)).all()
    proxy = np.asarray(table.column("proxy_loss").to_pylist())
    assert np.isfinite(proxy).all()
    rows = {r["method"]: r for r in table.to_pylist()}
    assert rows["target_only"]["selected_steps"] == 0
    assert rows["all"]["selected_fraction"] == pytest.approx(1.0)
    # one budget of prior steps for every method and granularity, within one point
    for method in set(cfg.methods) - {"all", "target_only"}:
        assert abs(rows[method]["selected_fraction"] - cfg.budget_percent / 100) <= 0.01, method
        assert rows[method]["budget"] == pytest.approx(0.1) and rows[method]["prior"] == "hard"
    assert {rows[m]["level"] for m in ("sr", "br", "iwr", "strap", "random")} == {"step"}
    assert {rows[m]["level"] for m in ("random-episode", "datamodel-regression", "oracle")} == {"episode"}


def test_selection_diagnostics(demo_run):
    """Every selection's manifest says what it is made of; the oracle takes successful demos only and
    the hard prior's target-task steps are all failed attempts."""
    cfg, _ = demo_run
    diag = Store(cfg.store).manifest(f"evals/{cfg.run}").metadata["selections"]
    assert diag["oracle"]["composition"]["success_share"] == 1.0
    assert diag["all"]["composition"]["target_task_share"] == diag["all"]["composition"]["target_failure_share"] > 0
    kinds = diag["all"]["composition"]["kinds"]
    assert set(kinds) <= {"success", "noisy", "truncated", "other_expert"} and "success" in kinds
    assert diag["br"]["jaccard"]["random"] < 1 and diag["br"]["jaccard"]["oracle"] == diag["oracle"]["jaccard"]["br"]


def test_rerun_resumes_from_the_store(demo_run):
    cfg, table = demo_run
    again = run_demo(cfg)
    assert again.to_pylist() == table.to_pylist()


def test_report_has_every_section(demo_run):
    cfg, table = demo_run
    page = build_report(Store(cfg.store), cfg.run)
    for heading in ("Success", "Scores", "Selections"):
        assert f"<h2>{heading}</h2>" in page
    assert len(success_summary(table)) == len(cfg.methods)


def test_added_seeds_train_only_the_new_jobs(demo_run):
    """Each (method, seed) row is committed as it finishes: a rerun with more seeds (or after a
    crash) reuses the committed rows (the same timings prove no retraining) and trains the rest.
    Last in the module: it replaces the run's table with a two-method one."""
    cfg, table = demo_run
    more = dataclasses.replace(cfg, methods=("target_only", "sr"), seeds=(0, 1))
    rows = {(r["method"], r["seed"]): r for r in run_demo(more).to_pylist()}
    first = {(r["method"], r["seed"]): r for r in table.to_pylist()}
    assert set(rows) == {(m, s) for m in ("target_only", "sr") for s in (0, 1)}
    for m in ("target_only", "sr"):
        assert rows[(m, 0)] == first[(m, 0)]
        assert rows[(m, 1)]["train_s"] > 0
    store = Store(cfg.store)
    assert store.manifest(job_key(cfg.run, "sr", 1)).stage == "demo-job"


def test_force_recomputes_every_stage_and_job(demo_run):
    """``distcur demo --force``: nothing is reused, not the prior, the scores nor a committed job.
    A one-method, one-seed run of its own (run "forced") in the module's store."""
    from distcur.data import scores_key, steps_key

    cfg, _ = demo_run
    small = dataclasses.replace(cfg, run="forced", methods=("random",), seeds=(0,))
    first = run_demo(small)
    store = Store(cfg.store)
    keys = [steps_key("metaworld"), scores_key("forced-random"), job_key("forced", "random", 0)]
    before = {k: store.manifest(k).created for k in keys}
    assert run_demo(small).to_pylist() == first.to_pylist()  # resumed: nothing rewritten
    assert {k: store.manifest(k).created for k in keys} == before
    forced = run_demo(small, force=True)
    assert all(store.manifest(k).created > before[k] for k in keys)
    assert forced.column("success").to_pylist() == first.column("success").to_pylist()


def test_recording_refuses_another_protocol_unless_a_variant(tmp_path):
    from distcur.stages.quality import merge_quality_json

    path = tmp_path / "quality.json"
    rec = {"task": "t", "prior": "hard", "method": "br", "seed": 0, "success": 0.5}
    protocol = {"evaluation": {"episodes": 50, "max_steps": 500, "seeds": [0, 1, 2], "proxy": "p"},
                "policy": {"hidden": [400, 400, 400]}, "prior_hard": {"tasks": ["a", "t"]}}
    merge_quality_json(path, {"protocol": protocol, "results": [rec]})
    # the same protocol as a run builds it (tuples), not as the file stores it (lists)
    merge_quality_json(path, {"protocol": {**protocol, "policy": {"hidden": (400, 400, 400)}},
                              "results": [{**rec, "seed": 1}]})
    # other seeds and another target's prior tasks are the same protocol
    same = {**protocol, "evaluation": {**protocol["evaluation"], "seeds": [0, 1, 2, 3, 4]},
            "prior_hard": {"tasks": ["a", "u"]}}
    merge_quality_json(path, {"protocol": same, "results": [{**rec, "task": "u"}]})
    fewer = {**protocol, "evaluation": {**protocol["evaluation"], "episodes": 20}}
    with pytest.raises(ValueError, match=r"evaluation.episodes: 20 \(file: 50\).*--variant"):
        merge_quality_json(path, {"protocol": fewer, "results": [{**rec, "task": "v"}]})
    assert len(json.load(open(path))["results"]) == 3
    merge_quality_json(path, {"protocol": {"variant/short": fewer["evaluation"]},
                              "results": [{**rec, "task": "v", "variant": "short"}]})
    assert json.load(open(path))["protocol"]["evaluation"]["episodes"] == 50


def test_the_recorded_datamodel_protocol_leaves_out_where_the_work_runs():
    from distcur.stages.demo import DemoConfig
    from distcur.stages.quality import protocol_of

    dm = DemoConfig().datamodel  # the demo's own datamodel options, each case changes some

    def with_(**over):
        return protocol_of(DemoConfig(datamodel={**dm, **over}))

    base = with_()["datamodel"]
    elsewhere = with_(executor="ray-train", ray_train={"num_workers": 4})
    assert elsewhere["datamodel"] == base  # the same numbers either way: one protocol
    assert "executor" not in base and "ray_train" not in base and base["prior_sources"] == ["metaworld"]
    assert "round_size" not in base["metagrad"]  # 1, the reference's sequence, as in records made before the field
    rounds = with_(metagrad={**dm.get("metagrad", {}), "recipe": "datamil", "round_size": 4})["datamodel"]
    assert rounds["metagrad"]["round_size"] == 4
    assert with_(lr=0.01)["datamodel"] != base


def test_demo_flags_build_the_nested_config(tmp_path):
    """The demo's flags are DemoConfig's fields (training and evaluation options included): the protocol
    policy's options, then the --config file, then the flags given; its manifests keep the flat layout."""
    from distcur.cli import build_parser
    from distcur.commands.demo import demo_config

    parser = build_parser()
    cfg = demo_config(parser.parse_args(["demo", "--protocol-policy", "--episodes", "7", "--train-steps", "30",
                                         "--no-cotrain", "--mixing", "split"]))
    assert cfg.train.hidden == (400, 400, 400) and cfg.train.steps == 30 and cfg.train.checkpoint_every == 0
    assert cfg.evaluation == DemoEvaluation(episodes=7, max_steps=500) and not cfg.cotrain
    assert cfg.policy_config(3, selected=True).alpha == 0.0 and cfg.policy_config(3, selected=True).seed == 3
    assert cfg.policy_config(3, selected=False).alpha == 1.0
    flat = cfg.flat()
    assert flat["train_steps"] == 30 and flat["hidden"] == (400, 400, 400) and flat["episodes"] == 7
    assert flat["mixing"] == "split" and not any(k.startswith("train.") for k in flat)
    path = tmp_path / "demo.yaml"
    path.write_text("train:\n  lr: 0.01\n  weight_decay: 0.001\nevaluation:\n  max_steps: 99\n")
    cfg = demo_config(parser.parse_args(["demo", "--config", str(path), "--lr", "0.02"]))
    assert cfg.train == TrainConfig(hidden=(256, 256), steps=1500, checkpoint_every=0, lr=0.02, weight_decay=0.001)
    assert cfg.evaluation.max_steps == 99 and cfg.evaluation.episodes == 20
    assert cfg.flat()["train.weight_decay"] == 0.001  # a policy option away from the default joins the fingerprint
    path.write_text("evaluation:\n  episodes: many\n")
    with pytest.raises(ValueError, match="demo.yaml.*episodes = 'many'"):
        demo_config(parser.parse_args(["demo", "--config", str(path)]))
