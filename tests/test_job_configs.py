"""Every shipped job config runs every stage it lists, through the job entry points, on a small fixture.

- ``jobs/configs/oxe_s3.yaml``: an RLDS prior and target in RT-1's fractal layout, written by TFDS,
  uploaded to a loopback S3 server (moto), the store on the same server; every section of the file
  runs as ``python jobs/<stage>.py --config ...`` with the config's bucket replaced by the test's and
  sizes (training steps, model counts) shrunk, nothing else changed.
- ``jobs/configs/metaworld.yaml``: the same on a tiny generated MetaWorld prior, local store.

Both are slow (a process per stage, joining one local Ray cluster; TorchTrainer runs); the fast
real-path test below runs the OXE config's ingest (Ray Data from loopback S3), datamodel, train and
evaluate sections in-process through ``jobs/_common.main`` with the test module's Ray.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pyarrow.fs as pafs
import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from conftest import load_jobs_common  # noqa: E402
from rlds_factory import FRACTAL_STATE_LAYOUT, make_rlds_dataset  # noqa: E402

REPO = os.path.dirname(HERE)
JOBS = os.path.join(REPO, "jobs")
STAGES = ("ingest", "embed", "score", "datamodel", "select", "rebalance", "train", "evaluate", "demo")
SHIPPED_BUCKET = "distcur-store"


common = load_jobs_common("distcur_jobs_common_e2e")

# Sizes only: what every entry of a section gets on top of what the shipped config says.
TINY_MODEL = {"hidden": [32, 32], "steps": 30, "batch_size": 32, "checkpoint_every": 0, "log_every": 10}
SHRINK = {
    "embed": {"concurrency": 2, "config": {"encoder_options": {"train_steps": 40, "batch_size": 64, "hidden": [32]}}},
    "datamodel": {"config": {"hidden": [16, 16], "batch_size": 32,
                             "regression": {"num_models": 8, "heldout_models": 4, "steps": 15, "models_per_batch": 8,
                                            "cv_folds": 3},
                             "metagrad": {"total_steps": 15, "meta_steps": 4, "iterations": 2}}},
    "rebalance": {"config": {"hidden": [16], "k_range": [2, 3],
                             "dro": {"steps": 10, "reference_steps": 10, "batch_size": 32}}},
    "train": {"config": TINY_MODEL},
}
# Sizes an entry sets itself, shrunk where it sets them (IWR's 128 reference shards are 16k KDE tasks;
# the datamodel's Ray Train workers hold a GPU each on a cluster, and this machine has none).
SHRINK_WHERE_SET = {"score": {"num_shards": 2, "subsample": 64}, "datamodel": {"gpus_per_worker": 0}}


def _oxe_config_text(bucket: str) -> str:
    with open(os.path.join(JOBS, "configs", "oxe_s3.yaml")) as f:
        text = f.read()
    assert f"s3://{SHIPPED_BUCKET}/" in text
    return text.replace(f"s3://{SHIPPED_BUCKET}/", f"s3://{bucket}/")


def shrunk(config: dict, shrink: dict, where_set: dict | None = None) -> dict:
    """``config`` with ``shrink[stage]`` merged into every entry of that stage's section (nested
    mappings merged, e.g. an entry's own ``config:``), and ``where_set[stage]``'s keys replaced in
    the entries that set them."""
    def merge(base, over):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        return out

    out = copy.deepcopy(config)
    for stage, over in shrink.items():
        if stage not in out:
            continue
        section = out[stage]
        out[stage] = [merge(e, over) for e in section] if isinstance(section, list) else merge(section or {}, over)
    for stage, over in (where_set or {}).items():
        for entry in out.get(stage) or []:
            entry.update({k: v for k, v in over.items() if k in entry})
    return out


def stages_of(config: dict) -> list[str]:
    """The stages a job config lists, in the file's order (the order to run them)."""
    return [k for k in config if k in STAGES]


# One local Ray cluster for every job of a test, in a child process we own (as `ray job submit` jobs
# share their cluster: RAY_ADDRESS). Started after the loopback S3 server, so its workers inherit the
# endpoint; a start that misses Ray's fixed 30 s raylet wait on a loaded machine is retried.
CLUSTER_SCRIPT = """
import sys
from ray.cluster_utils import Cluster
for attempt in range(4):
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        break
    except Exception as e:
        if "timed out during startup" not in str(e) or attempt == 3:
            raise
print("ADDRESS", cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def job_cluster(s3_server):
    """The address of a local Ray cluster the jobs join (RAY_ADDRESS)."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        seen = []
        for line in proc.stdout:
            if line.startswith("ADDRESS "):
                break
            seen.append(line)
        else:
            raise RuntimeError(f"local Ray cluster did not start (exit code {proc.poll()}): {''.join(seen)}")
        yield line.split()[1]
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_job(stage: str, config_path: str, cwd: str, address: str, timeout: int = 1200) -> str:
    """``python jobs/<stage>.py --config ...`` in a fresh process joining the cluster at ``address``
    (RAY_ADDRESS, as under ``ray job submit``); its output."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=REPO,
               RAY_ADDRESS=address)
    r = subprocess.run([sys.executable, os.path.join(JOBS, f"{stage}.py"), "--config", config_path],
                       capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert r.returncode == 0, f"jobs/{stage}.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout


def run_every_stage(config: dict, path, address: str) -> tuple[str, dict[str, str]]:
    """Write ``config`` to ``path`` and run each stage it lists, in order, as its job; (path, outputs)."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    outputs = {}
    for stage in stages_of(config):
        outputs[stage] = run_job(stage, str(path), str(path.parent), address)
        print(f"jobs/{stage}.py done", flush=True)
    return str(path), outputs


@pytest.fixture(scope="module")
def fractal_datasets(tmp_path_factory):
    """A prior and a target in RT-1's fractal20220817_data layout (the shipped RLDS config reads them)."""
    root = tmp_path_factory.mktemp("oxe")
    prior = make_rlds_dataset(root / "prior", name="fractal20220817_data", num_episodes=8, num_shards=2,
                              steps=(12, 16), seed=3, language_in_observation=True,
                              state_layout=FRACTAL_STATE_LAYOUT)
    target = make_rlds_dataset(root / "target", name="fractal20220817_data", num_episodes=3, num_shards=1,
                               steps=(12, 14), seed=4, language_in_observation=True,
                               state_layout=FRACTAL_STATE_LAYOUT)
    return prior, target


def upload_inputs(config: dict, fractal_datasets) -> None:
    """Copy the prior and target to the S3 paths the config's ingest entries name."""
    from distcur.store import resolve

    prior, target = fractal_datasets
    entries = config["ingest"]
    for entry, ds in zip(entries, (prior, target)):
        fs, path = resolve(entry["path"])
        pafs.copy_files(ds.path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@pytest.mark.slow
def test_oxe_s3_config_runs_every_stage_on_loopback_s3(job_cluster, s3_bucket, fractal_datasets, tmp_path):
    from distcur.data import embeddings_key, eval_key, policy_key, scores_key, selection_key, steps_key
    from distcur.store import Store

    bucket = s3_bucket[len("s3://"):]
    config = yaml.safe_load(_oxe_config_text(bucket))
    upload_inputs(config, fractal_datasets)
    config = shrunk(config, SHRINK, SHRINK_WHERE_SET)
    path, outputs = run_every_stage(config, tmp_path / "oxe_s3.yaml", job_cluster)
    assert stages_of(config) == ["ingest", "embed", "score", "datamodel", "select", "rebalance", "train", "evaluate"]

    store = Store(config["common"]["store"])
    prior, target = fractal_datasets
    assert store.manifest(steps_key("fractal20220817_data")).rows == prior.num_steps
    assert store.manifest(steps_key("target-pick-coke-can")).rows == target.num_steps
    for s in ("fractal20220817_data", "target-pick-coke-can"):
        assert store.manifest(embeddings_key("vae", s)) is not None
    for entry in config["score"] + config["datamodel"]:
        assert store.manifest(scores_key(entry["run"])).rows == prior.num_steps
    dm = store.manifest(scores_key("datamodel-regression-pick-coke-can"))
    assert dm.config["prior_sources"] == ["fractal20220817_data"]  # from the store, not a MetaWorld default
    for entry in config["select"] + config["rebalance"]:
        assert store.manifest(selection_key(entry["run"])).rows > 0
    for entry in config["train"]:
        assert store.manifest(policy_key(entry["out"])) is not None
    for entry in config["evaluate"]:
        rows = store.read_table(eval_key(entry["policy"])).to_pylist()
        assert [r["evaluation"] for r in rows] == ["proxy-only"]
        assert np.isnan(rows[0]["success"]) and np.isfinite(rows[0]["proxy_loss"])
        assert rows[0]["proxy_source"] == "target-pick-coke-can"
    assert outputs["evaluate"].count("PROXY-ONLY evaluation") == len(config["evaluate"])
    # resubmitted, a stage finds its outputs committed and recomputes nothing
    before = store.manifest(scores_key("iwr-pick-coke-can")).created
    run_job("score", path, str(tmp_path), job_cluster)
    assert store.manifest(scores_key("iwr-pick-coke-can")).created == before


TINY_METAWORLD = {
    "ingest": {"heldout_demos": 1,
               "config": {"tasks": ["reach-wall-v3"], "success_per_task": 1, "failed_per_task": 1,
                          "failed_max_steps": 60, "target_demos": 2, "chunk_episodes": 1}},
    "score": {},
    "evaluate": {"episodes": 1, "seeds": [0]},
    "demo": {"seeds": [0], "episodes": 1,
             "config": {"evaluation": {"max_steps": 40, "heldout_demos": 1}, "train": {"steps": 20, "hidden": [16, 16]},
                        "vae": {"train_steps": 30, "hidden": [16]},
                        "prior": {"tasks": ["reach-v3"], "success_per_task": 1, "failed_per_task": 1,
                                  "failed_max_steps": 30, "max_steps": 150},
                        "datamodel": {"hidden": [16, 16],
                                      "regression": {"num_models": 8, "heldout_models": 4, "steps": 10,
                                                     "models_per_batch": 8, "cv_folds": 3},
                                      "metagrad": {"total_steps": 10, "meta_steps": 3, "iterations": 2}}}},
}


@pytest.mark.slow
def test_metaworld_config_runs_every_stage(job_cluster, tmp_path):
    from distcur.data import eval_key, policy_key, scores_key, selection_key
    from distcur.store import Store

    with open(os.path.join(JOBS, "configs", "metaworld.yaml")) as f:
        config = yaml.safe_load(f)
    store_uri = str(tmp_path / "store")
    config["common"]["store"] = store_uri
    config["ingest"]["out"] = store_uri
    config["demo"]["store"] = str(tmp_path / "demo-store")
    config = shrunk(shrunk(config, SHRINK), TINY_METAWORLD)
    _, outputs = run_every_stage(config, tmp_path / "metaworld.yaml", job_cluster)
    assert list(outputs) == ["ingest", "embed", "score", "datamodel", "select", "rebalance", "train", "evaluate",
                             "demo"]
    store = Store(store_uri)
    for entry in config["score"] + config["datamodel"]:
        assert store.manifest(scores_key(entry["run"])).rows > 0
    assert store.manifest(scores_key(config["datamodel"][0]["run"])).config["prior_sources"] == ["metaworld"]
    for entry in config["select"] + config["rebalance"]:
        assert store.manifest(selection_key(entry["run"])).rows > 0
    for entry in config["train"]:
        assert store.manifest(policy_key(entry["out"])) is not None
    for entry in config["evaluate"]:
        (row,) = store.read_table(eval_key(entry["policy"])).to_pylist()
        assert row["evaluation"] == "rollouts" and 0 <= row["success"] <= 1 and np.isfinite(row["proxy_loss"])
    assert "PROXY-ONLY" not in outputs["evaluate"]
    demo = Store(config["demo"]["store"])
    assert demo.manifest("evals/demo") is not None
    assert any(name.endswith(".html") for name in demo.listdir("reports"))


# -- fast: the OXE config's real path, in-process ------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_then_ray(s3_server):
    """A local Ray started after the loopback S3 server is up, so its workers inherit the endpoint."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_oxe_config_ingest_datamodel_train_evaluate_on_loopback_s3(s3_then_ray, s3_bucket, fractal_datasets,
                                                                   tmp_path, capsys):
    from distcur.data import eval_key, scores_key, steps_key
    from distcur.store import Store

    bucket = s3_bucket[len("s3://"):]
    config = yaml.safe_load(_oxe_config_text(bucket))
    upload_inputs(config, fractal_datasets)
    config = shrunk(config, SHRINK, SHRINK_WHERE_SET)
    # Ray Train's TorchTrainer start-up is the slow test's; here the same section trains in-process.
    config["train"] = [{**config["train"][0], "ray": False}]
    config["evaluate"] = config["evaluate"][:1]
    path = tmp_path / "oxe_s3.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    for stage in ("ingest", "datamodel", "train", "evaluate"):
        assert common.main(stage, ["--config", str(path)]) == 0, capsys.readouterr().err[-4000:]
    out = capsys.readouterr().out
    store = Store(config["common"]["store"])
    prior, target = fractal_datasets
    meta = store.manifest(steps_key("fractal20220817_data")).metadata["fractal20220817_data"]
    assert (meta["state_dim"], meta["action_dim"], meta["steps"]) == (8, 7, prior.num_steps)
    dm = store.manifest(scores_key("datamodel-regression-pick-coke-can"))
    assert dm.config["prior_sources"] == ["fractal20220817_data"] and dm.metadata["inject_target"] is True
    (row,) = store.read_table(eval_key("target-only-pick-coke-can")).to_pylist()
    assert row["evaluation"] == "proxy-only" and np.isnan(row["success"]) and np.isfinite(row["proxy_loss"])
    assert "target-only-pick-coke-can: PROXY-ONLY evaluation, no simulator for task 'pick-coke-can'" in out
