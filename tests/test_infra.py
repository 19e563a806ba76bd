"""cluster.yaml, infra/ (KubeRay, CloudFormation, Docker, runtime env): validated by the real tools.

- cluster.yaml goes through Ray's own launcher validation (``prepare_config`` then
  ``validate_config``, what ``ray up`` runs before contacting the cloud) and every node_config
  through botocore's offline model of EC2 ``RunInstances`` (what Ray passes it to).
- The CloudFormation template is linted by cfn-lint, then deployed on moto's S3/IAM/CFN server
  (a separate process on loopback) where IAM is enforced: the store works with the worker
  policy's credentials through distcur's own Store, and everything outside it is denied.
- KubeRay manifests parse, carry ray.io/v1 kinds with fields of the CRDs, and every RayJob's
  entry point names an existing job file and config whose section translates to a valid argv.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")
CFN = os.path.join(REPO, "infra", "aws", "bucket-and-iam.yaml")
K8S = os.path.join(REPO, "infra", "k8s")
STAGES = ("ingest", "embed", "score", "select", "datamodel", "rebalance", "train", "evaluate", "demo")

# Top-level spec fields of the KubeRay v1 CRDs (ray-operator/config/crd/bases/ray.io_*.yaml).
RAYCLUSTER_SPEC_FIELDS = {
    "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}


def _ray_prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# -- cluster.yaml ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_passes_ray_validation(cluster_config):
    prepared = _ray_prepared(cluster_config)
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    gpu = [name for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [name for name, t in workers.items() if not t["resources"].get("GPU")]
    assert gpu and cpu, f"need CPU and GPU worker types, got {sorted(workers)}"
    for name, t in workers.items():
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert t["max_workers"] >= 1 and t["min_workers"] == 0, name
    head = types[prepared["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head (drivers, GCS) must not be spot"
    for name, t in types.items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert sum(t["max_workers"] for t in workers.values()) <= prepared["max_workers"]


def test_cluster_yaml_installs_this_checkout(cluster_config):
    mounts = cluster_config["file_mounts"]
    (remote,) = [r for r, local in mounts.items() if os.path.abspath(os.path.join(REPO, local)) == REPO]
    setup = " && ".join(cluster_config["setup_commands"])
    assert re.search(rf"pip install .*-e \"?{re.escape(remote)}", setup), setup
    pins = open(os.path.join(REPO, "pyproject.toml")).read()
    for pin in ("torch==2.13.0", "==2.60.0"):
        assert pin in setup and pin in pins, pin


def test_cluster_node_configs_are_valid_ec2_run_instances_input(cluster_config):
    import botocore.session
    from botocore.exceptions import ParamValidationError
    from botocore.validate import validate_parameters

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    # Ray adds these when it launches a node.
    launch = {"MinCount": 1, "MaxCount": 1, "ImageId": "ami-00000000"}
    for node_type in cluster_config["available_node_types"].values():
        validate_parameters({**node_type["node_config"], **launch}, shape)
    bad = copy.deepcopy(cluster_config["available_node_types"]["gpu_worker"]["node_config"])
    bad["InstanceMarketOptions"]["MarketType"] = {"spot": True}
    with pytest.raises(ParamValidationError, match="MarketType"):
        validate_parameters({**bad, **launch}, shape)


def test_ray_validation_rejects_a_broken_cluster_yaml(cluster_config):
    import jsonschema

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = -1
    with pytest.raises(jsonschema.ValidationError):
        _ray_prepared(broken)
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _ray_prepared(broken)


# -- CloudFormation ------------------------------------------------------------------------------


def test_cloudformation_template_lints_clean():
    """cfn-lint (its Python API; same rules as `cfn-lint infra/aws/bucket-and-iam.yaml`)."""
    from cfnlint.api import lint

    text = open(CFN).read()
    assert [str(m) for m in lint(text)] == []
    # The linter does catch mistakes: a misspelt bucket property fails.
    matches = [str(m) for m in lint(text.replace("VersioningConfiguration:", "VersioningConfig:", 1))]
    assert any("VersioningConfig" in m for m in matches), matches


def test_cloudformation_bucket_is_private_encrypted_versioned_and_policies_scoped():
    from cfnlint.decode import cfn_yaml

    template = cfn_yaml.load(CFN)
    resources = template["Resources"]
    (bucket,) = [r for r in resources.values() if r["Type"] == "AWS::S3::Bucket"]
    props = bucket["Properties"]
    assert props["VersioningConfiguration"]["Status"] == "Enabled"
    sse = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert sse["SSEAlgorithm"] in ("aws:kms", "AES256")
    assert all(props["PublicAccessBlockConfiguration"].values()) and len(props["PublicAccessBlockConfiguration"]) == 4

    (bucket_policy,) = [r for r in resources.values() if r["Type"] == "AWS::S3::BucketPolicy"]
    (deny,) = bucket_policy["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}

    statements = []
    for name, r in resources.items():
        if r["Type"] == "AWS::IAM::ManagedPolicy":
            statements += [(name, s) for s in r["Properties"]["PolicyDocument"]["Statement"]]
        if r["Type"] == "AWS::IAM::Role":
            for p in r["Properties"].get("Policies", []):
                statements += [(f"{name}.{p['PolicyName']}", s) for s in p["PolicyDocument"]["Statement"]]
    assert statements
    for where, s in statements:
        assert s["Effect"] == "Allow", where
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        assert not any("*" in a for a in actions), f"{where}: wildcard action in {actions}"
        resource = s["Resource"]
        if resource == "*":  # only read-only Describe calls may be unscoped
            assert all(a.startswith("ec2:Describe") for a in actions), f"{where}: {actions} on Resource '*'"
        if any(a.startswith("s3:") and a != "s3:ListBucket" and a != "s3:GetBucketLocation" for a in actions):
            sub = resource["Fn::Sub"]
            assert sub.startswith("${StoreBucket.Arn}/${") and sub.endswith("/*"), f"{where}: {sub}"
            if any(a in ("s3:PutObject", "s3:DeleteObject") for a in actions):
                assert sub == "${StoreBucket.Arn}/${StorePrefix}/*", f"{where}: writes outside the store prefix"
        if "s3:ListBucket" in actions:
            assert "s3:prefix" in s["Condition"]["StringLike"], f"{where}: listing not limited to prefixes"


@pytest.fixture
def moto_iam_server():
    """moto's server in its own process with IAM enforcement switchable on (``/moto-api/reset-auth``)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server on {endpoint} did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _enforce_iam(endpoint: str) -> None:
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(req, timeout=10)


def test_worker_policy_allows_the_store_and_denies_the_rest(moto_iam_server, monkeypatch):
    """Deploy the stack, then use the store with only the worker policy's credentials."""
    import boto3
    import pyarrow as pa
    from botocore.exceptions import ClientError

    from distcur.store import Store

    admin = dict(endpoint_url=moto_iam_server, region_name="us-west-2",
                 aws_access_key_id="testing", aws_secret_access_key="testing")
    cfn = boto3.client("cloudformation", **admin)
    cfn.create_stack(
        StackName="distcur",
        TemplateBody=open(CFN).read(),
        Parameters=[{"ParameterKey": "BucketName", "ParameterValue": "distcur-infra-test"}],
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )
    stack = cfn.describe_stacks(StackName="distcur")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    assert outputs["StoreUri"] == "s3://distcur-infra-test/distcur"
    resources = {r["LogicalResourceId"]: r["PhysicalResourceId"]
                 for r in cfn.list_stack_resources(StackName="distcur")["StackResourceSummaries"]}

    s3 = boto3.client("s3", **admin)
    s3.put_object(Bucket="distcur-infra-test", Key="oxe/fractal20220817_data/0.1.0/dataset_info.json", Body=b"{}")
    s3.put_object(Bucket="distcur-infra-test", Key="private/secret.txt", Body=b"not for the cluster")
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="node")
    iam.attach_user_policy(UserName="node", PolicyArn=resources["StoreAccessPolicy"])
    key = iam.create_access_key(UserName="node")["AccessKey"]
    _enforce_iam(moto_iam_server)

    for name, value in {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_REGION": "us-west-2",
        "DISTCUR_S3_ENDPOINT": moto_iam_server,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    store = Store(outputs["StoreUri"])
    table = pa.table({"source": ["fractal"] * 3, "episode": pa.array([0, 1, 2], pa.int64())})
    # One commit per key: moto authorises a bulk delete (the GC of a replaced version) as
    # s3:DeleteObject on the bucket rather than per key as AWS does, so it cannot be tested here.
    store.write_table("steps/source=fractal", table, stage="ingest", config={"n": 1})
    assert store.read_table("steps/source=fractal").equals(table)
    assert store.manifest("steps/source=fractal").config == {"n": 1}
    assert store.is_done("steps/source=fractal", "ingest", {"n": 1}, {})

    node = boto3.client("s3", endpoint_url=moto_iam_server, region_name="us-west-2",
                        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    body = node.get_object(Bucket="distcur-infra-test", Key="oxe/fractal20220817_data/0.1.0/dataset_info.json")
    assert body["Body"].read() == b"{}"
    denied = [
        lambda: node.put_object(Bucket="distcur-infra-test", Key="oxe/fractal20220817_data/x", Body=b"x"),
        lambda: node.get_object(Bucket="distcur-infra-test", Key="private/secret.txt"),
        lambda: node.put_object(Bucket="distcur-infra-test", Key="private/x", Body=b"x"),
        lambda: node.delete_bucket_policy(Bucket="distcur-infra-test"),
        lambda: node.put_bucket_versioning(Bucket="distcur-infra-test",
                                           VersioningConfiguration={"Status": "Suspended"}),
    ]
    for attempt in denied:
        with pytest.raises(ClientError, match="AccessDenied"):
            attempt()
    with pytest.raises(OSError, match="ACCESS_DENIED|AccessDenied|403"):
        Store("s3://distcur-infra-test/private").write_table("steps/source=x", table, stage="ingest")


# -- KubeRay ------------------------------------------------------------------------------------


def _docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def test_raycluster_manifest():
    import ray

    docs = _docs(os.path.join(K8S, "raycluster.yaml"))
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]["template"]["spec"]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount" and d["apiVersion"] == "v1"}
    assert head["serviceAccountName"] in accounts
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for c in groups["gpu"]["template"]["spec"]["containers"]]
    assert gpu_limits == ["1"]
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert g["template"]["spec"]["serviceAccountName"] in accounts


def test_one_rayjob_per_job_and_each_entrypoint_resolves():
    sys.path.insert(0, os.path.join(REPO, "jobs"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    cluster = next(d for d in _docs(os.path.join(K8S, "raycluster.yaml")) if d["kind"] == "RayCluster")
    jobs = {os.path.basename(p)[: -len(".py")] for p in glob.glob(os.path.join(REPO, "jobs", "[!_]*.py"))}
    assert jobs == set(STAGES)
    manifests = sorted(glob.glob(os.path.join(K8S, "rayjob-*.yaml")))
    assert {os.path.basename(p)[len("rayjob-") : -len(".yaml")] for p in manifests} == set(STAGES)
    for path in manifests:
        (job,) = _docs(path)
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob"), path
        spec = job["spec"]
        assert set(spec) <= RAYJOB_SPEC_FIELDS, (path, set(spec) - RAYJOB_SPEC_FIELDS)
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}, path
        assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode")
        python, script, flag, config = shlex.split(spec["entrypoint"])
        stage = os.path.basename(path)[len("rayjob-") : -len(".yaml")]
        assert python == "python" and flag == "--config", path
        # The image holds this checkout at /app (infra/docker/Dockerfile WORKDIR).
        assert script == f"/app/jobs/{stage}.py", path
        local_config = os.path.join(REPO, config.removeprefix("/app/"))
        assert os.path.exists(local_config), f"{path}: {config} is not in the repository"
        assert stage in _common.load_job_config(local_config), f"{path}: {config} has no '{stage}' section"


# -- Docker, runtime env -----------------------------------------------------------------------


def test_dockerfile_pins_match_the_project():
    text = open(os.path.join(REPO, "infra", "docker", "Dockerfile")).read()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert re.search(r'"torch==2\.13\.0" --index-url', text) and "download.pytorch.org/whl/cpu" in text
    assert 'ray[data,train,tune,default]==2.60.0' in text
    assert re.search(r"^WORKDIR /app$", text, re.M)
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert os.path.exists(os.path.join(REPO, path)), f"Dockerfile copies missing {path}"
    assert "pip install --no-deps -e ." in text


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    with open(os.path.join(REPO, "infra", "runtime_env.yaml")) as f:
        env = yaml.safe_load(f)
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # type-checks each field
    assert env["working_dir"] == "." and ".venv" in env["excludes"]


def test_readme_has_the_commands():
    text = open(os.path.join(REPO, "infra", "README.md")).read()
    for line in ("ray up cluster.yaml", "ray job submit", "kubectl apply -f infra/k8s/raycluster.yaml",
                 "aws cloudformation deploy", "docker build"):
        assert line in text, line
