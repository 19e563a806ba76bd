"""jobs/: YAML job configs -> `distcur <stage>` argv, run in-process and as real Ray jobs.

- The translator is checked against a real argparse tree (every kind of option) by a round
  trip: the argv it builds parses back to the config's values; wrong keys fail loudly.
- Every section of the shipped configs translates into an argv its stage's own parser accepts.
- The job scripts run as scripts (``python jobs/select.py`` must not shadow the stdlib).
- End to end: a tiny MetaWorld ingest and a balanced-BC rebalance run through the job entry
  points on the module's local Ray and land in the store; and a job submitted through
  ``JobSubmissionClient`` to a local Ray cluster with a dashboard writes its table to the store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import load_jobs_common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(REPO, "jobs")
CONFIGS = sorted(os.path.join(JOBS, "configs", f) for f in os.listdir(os.path.join(JOBS, "configs")) if f.endswith(".yaml"))
STAGES = ("ingest", "embed", "score", "select", "datamodel", "rebalance", "train", "evaluate", "demo")


common = load_jobs_common()


# -- translation --------------------------------------------------------------------------------


def _toy_root() -> argparse.ArgumentParser:
    """A real parser tree with every kind of option a stage uses."""
    root = argparse.ArgumentParser(prog="distcur")
    stages = root.add_subparsers(dest="command", required=True)
    ingest = stages.add_parser("ingest")
    kinds = ingest.add_subparsers(dest="kind", required=True)
    mw = kinds.add_parser("metaworld")
    mw.add_argument("--out")
    mw.add_argument("--tasks", nargs="+")
    mw.add_argument("--episodes-per-task", type=int)
    mw.add_argument("--force", action="store_true")
    mw.add_argument("--no-images", dest="images", action="store_false")
    mw.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True)
    mw.add_argument("--tag", action="append")
    mw.add_argument("--config")
    report = stages.add_parser("report")
    report.add_argument("run")
    report.add_argument("--store")
    return root


def test_entry_argv_round_trips_every_option_kind(tmp_path):
    root = _toy_root()
    entry = {
        "command": "metaworld",
        "tasks": ["reach-v3", "push-v3"],
        "episodes_per_task": 3,
        "force": True,
        "no_images": True,
        "shuffle": False,
        "tag": ["a", "b"],
        "config": {"success_per_task": 2, "tasks": ["reach-v3"]},
    }
    argv = common.entry_argv(root, "ingest", entry, {"out": "/s", "store": "/ignored-here"}, "cfg", str(tmp_path))
    args = root.parse_args(argv)
    assert argv[:2] == ["ingest", "metaworld"]
    assert (args.out, args.tasks, args.episodes_per_task) == ("/s", ["reach-v3", "push-v3"], 3)
    assert (args.force, args.images, args.shuffle, args.tag) == (True, False, False, ["a", "b"])
    with open(args.config) as f:  # an inline mapping became a YAML file for the stage's --config
        assert yaml.safe_load(f) == entry["config"]
    # false / null leave flags and defaults alone; a section key overrides `common`
    args = root.parse_args(common.entry_argv(root, "ingest", {"command": "metaworld", "force": False, "tasks": None,
                                                              "no_images": False, "out": "/mine"}, {"out": "/s"}, "cfg"))
    assert (args.force, args.tasks, args.images, args.out, args.shuffle) == (False, None, True, "/mine", True)
    args = root.parse_args(common.entry_argv(root, "ingest", {"command": "metaworld", "no_shuffle": True}, {}, "cfg"))
    assert args.shuffle is False
    # a positional is filled from its key; common options the stage lacks are not passed
    assert common.entry_argv(root, "report", {"run": "demo"}, {"store": "/s", "out": "/o"}, "cfg") == [
        "report", "demo", "--store", "/s"]


@pytest.mark.parametrize(
    ("stage", "entry", "match"),
    [
        ("ingest", {"command": "metaworld", "bogus_key": 1}, r"cfg: `distcur ingest metaworld` has no option --bogus-key"),
        ("ingest", {"tasks": ["a"]}, r"needs a sub-command; set command: to one of \['metaworld'\]"),
        ("ingest", {"command": "rlds"}, r"has no sub-command 'rlds'; choices: \['metaworld'\]"),
        ("ingest", {"command": "metaworld", "out": ["a", "b"]}, r"cfg: out: --out takes one value, got a list"),
        ("ingest", {"command": "metaworld", "force": "yes"}, r"--force is a flag; expected true or false"),
        ("report", {"store": "/s"}, r"needs the positional argument 'run'"),
        ("report", {"run": "x", "command": "y"}, r"`distcur report` has no sub-commands"),
        ("train", {}, r"distcur has no 'train' command \(is distcur/commands/train.py missing\?\)"),
    ],
)
def test_entry_argv_rejects_what_the_stage_does_not_define(stage, entry, match):
    with pytest.raises(ValueError, match=match):
        common.entry_argv(_toy_root(), stage, entry, {}, "cfg")


def test_job_config_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("commons: {store: x}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown top-level key\(s\) \['commons'\]"):
        common.load_job_config(bad)
    bad.write_text("select: [1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.yaml: select\[0\] must be a mapping"):
        common.section_entries(common.load_job_config(bad), "select", str(bad))
    with pytest.raises(ValueError, match=r"bad.yaml: no 'score' section; sections present: \['select'\]"):
        common.section_entries(common.load_job_config(bad), "score", str(bad))


def test_inline_stage_config_errors_name_the_job_config_and_section(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"common": {"store": str(tmp_path / "store")},
                                    "embed": {"config": {"batch_size": "many"}}}))
    assert common.main("embed", ["--config", str(path)]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distcur embed: error:")]
    assert error.startswith(f"distcur embed: error: {path}: embed: config: batch_size = 'many' is a str, but "
                            "EmbedConfig.batch_size expects")
    assert "distcur-job-" not in error  # not the temporary file, gone by the time the error is read


def _section_cases():
    cases = []
    for path in CONFIGS:
        with open(path) as f:
            config = yaml.safe_load(f)
        cases += [pytest.param(path, stage, id=f"{os.path.basename(path)}-{stage}") for stage in STAGES if stage in config]
    return cases


@pytest.mark.parametrize(("path", "stage"), _section_cases())
def test_shipped_config_sections_parse_with_the_stage_cli(path, stage, tmp_path):
    from distcur.cli import build_parser

    root = build_parser()
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    if stage not in sub.choices:
        pytest.skip(f"distcur/commands/{stage}.py is not there yet")
    argvs = common.stage_argvs(path, stage, tmpdir=str(tmp_path))
    assert argvs
    for argv in argvs:
        try:
            args = root.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{path}: {stage}: `distcur {' '.join(argv)}` is rejected by the stage's parser ({e})")
        assert args.command == stage and callable(args.func)


def test_common_store_reaches_every_stage_including_ingest(tmp_path):
    from distcur.cli import build_parser

    path = tmp_path / "job.yaml"
    path.write_text("common: {store: s3://b/p}\ningest: {command: metaworld, target: reach-v3}\n"
                    "embed: {encoder: vae}\n")
    root = build_parser()
    for stage, dest in (("ingest", "out"), ("embed", "store")):
        (argv,) = common.stage_argvs(path, stage, tmpdir=str(tmp_path))
        assert getattr(root.parse_args(argv), dest) == "s3://b/p"


def test_every_stage_has_a_job_and_both_configs_exist():
    scripts = {f[: -len(".py")] for f in os.listdir(JOBS) if f.endswith(".py") and not f.startswith("_")}
    assert scripts == set(STAGES)
    assert {os.path.basename(p) for p in CONFIGS} >= {"metaworld.yaml", "oxe_s3.yaml"}
    oxe = common.load_job_config(os.path.join(JOBS, "configs", "oxe_s3.yaml"))
    assert oxe["common"]["store"].startswith("s3://")


def test_job_scripts_run_as_scripts(tmp_path):
    """`python jobs/select.py` puts jobs/ on sys.path, where select.py would shadow the stdlib."""
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"select": {"store": str(tmp_path), "scores": "s", "run": "r", "top": 5}}, sort_keys=False))
    result = subprocess.run(
        [sys.executable, os.path.join(JOBS, "select.py"), "--config", str(config), "--set", "top=7", "--dry-run"],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"distcur select --store {tmp_path} --scores s --run r --top 7"
    assert common.main("select", ["--config", str(config), "--set", "tpo=7"]) == 2


# -- end to end ----------------------------------------------------------------------------------

TINY_PRIOR = {
    "tasks": ["reach-wall-v3"],
    "success_per_task": 1,
    "failed_per_task": 1,
    "failed_max_steps": 20,
    "target_demos": 1,
    "chunk_episodes": 1,
}


def _tiny_pipeline_config(tmp_path, store: str) -> str:
    config = {
        "common": {"store": store},
        "ingest": {"command": "metaworld", "out": store, "target": "reach-v3", "config": TINY_PRIOR},
        "rebalance": {"method": "frequency", "groups": "task", "run": "balanced"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def test_jobs_run_a_tiny_pipeline_into_the_store(ray_session, tmp_path, capsys):
    import numpy as np

    from distcur.data import list_sources, selection_key, steps_key
    from distcur.store import Store

    store_uri = str(tmp_path / "store")
    config = _tiny_pipeline_config(tmp_path, store_uri)
    for stage in ("ingest", "rebalance"):
        assert common.main(stage, ["--config", config]) == 0, capsys.readouterr().err
    store = Store(store_uri)
    assert sorted(list_sources(store)) == ["metaworld", "target-reach-v3", "target-reach-v3-heldout"]
    prior = store.manifest(steps_key("metaworld"))
    target = store.manifest(steps_key("target-reach-v3"))
    assert prior.rows > 0 and prior.stage.startswith("ingest")
    assert prior.config["tasks"] == ["reach-wall-v3", "reach-v3"] and prior.config["success_per_task"] == 1
    weights = store.read_table(selection_key("balanced"))
    assert weights.num_rows == prior.rows + target.rows
    assert np.isfinite(weights.column("weight").to_numpy()).all()
    assert store.manifest(selection_key("balanced")).stage.startswith("rebalance")
    # A resubmitted job finds its outputs committed and skips the work.
    before = store.manifest(steps_key("metaworld")).created
    assert common.main("ingest", ["--config", config]) == 0
    assert store.manifest(steps_key("metaworld")).created == before


# The head gets its own dashboard and dashboard-agent ports: the agent's default port (52365)
# is shared by every Ray on the machine, and a job needs the agent of its head.
CLUSTER_SCRIPT = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
    "dashboard_port": int(sys.argv[1]), "dashboard_agent_listen_port": int(sys.argv[2])})
print("DASHBOARD", cluster.webui_url, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@pytest.fixture
def ray_cluster_with_dashboard(tmp_path):
    """A local Ray cluster with its dashboard, in a child process we own; yields the job API URL."""
    from conftest import free_port

    # A loopback-only test cluster: no token auth, so the client needs no token (Ray 2.60
    # otherwise enables it for a new local cluster from ~/.ray/auth_token).
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_SCRIPT, str(free_port()), str(free_port())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        seen = []
        for line in proc.stdout:  # Ray may print its own lines first
            if line.startswith("DASHBOARD "):
                break
            seen.append(line)
        else:
            raise RuntimeError(f"local Ray cluster did not start (exit code {proc.poll()}): {''.join(seen)}")
        yield "http://" + line.split()[1]
    finally:
        proc.stdin.close()  # the child shuts Ray down and exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_job_submitted_with_job_submission_client_writes_the_store(ray_cluster_with_dashboard, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from distcur.data import steps_key, target_source
    from distcur.store import Store

    store_uri = str(tmp_path / "store")
    config = _tiny_pipeline_config(tmp_path, store_uri)
    client = JobSubmissionClient(ray_cluster_with_dashboard)
    deadline = time.time() + 120
    while True:  # the head's job agent may still be starting on a busy machine
        try:
            job_id = client.submit_job(
                entrypoint=f"{sys.executable} jobs/ingest.py --config {config}",
                runtime_env={"working_dir": REPO, "excludes": ["benchmarks/results", "*.whl"]},
            )
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1.0)
    deadline = time.time() + 240
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.time() < deadline, f"job {job_id} still {status} after 240 s:\n{client.get_job_logs(job_id)}"
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert f"distcur ingest metaworld --out {store_uri} --target reach-v3" in logs
    store = Store(store_uri)
    prior = store.manifest(steps_key("metaworld"))
    target = store.manifest(steps_key(target_source("reach-v3")))
    assert prior.stage.startswith("ingest") and prior.rows > 0 and target.rows > 0
    assert prior.config["tasks"] == ["reach-wall-v3", "reach-v3"]
    table = store.read_table(steps_key("metaworld"))
    assert table.num_rows == prior.rows and set(table.column("task").to_pylist()) == {"reach-wall-v3", "reach-v3"}
