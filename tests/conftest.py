"""Shared fixtures: a real local Ray per module, a real S3-compatible server on loopback."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Fake AWS credentials from the start, so every Ray the tests start inherits them (workers get
# credentials from their process environment, never through a runtime env); the S3 endpoint
# (not a secret) is forwarded to the tasks when the loopback S3 server is up.
for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")):
    os.environ.setdefault(_k, _v)


def load_jobs_common(name: str = "distcur_jobs_common"):
    """``jobs/_common.py`` (the job entry points' module; jobs/ is not a package) as a module."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "_common.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray session shared by the tests of a module."""
    import ray

    # On a loaded shared machine the raylet may miss Ray's fixed 30 s registration window:
    # retry a few times rather than fail the whole module.
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            # address="local": always a fresh private instance, never a `ray start` cluster that
            # another process left running on this machine
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3-compatible server on a free loopback port.

    Sets the standard AWS variables plus ``DISTCUR_S3_ENDPOINT`` so pyarrow.fs and boto3 talk
    to it exactly as to AWS; yields the endpoint URL.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "DISTCUR_S3_ENDPOINT": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields ``s3://bucket``."""
    import boto3

    name = f"distcur-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
