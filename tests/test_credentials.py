"""No AWS credential in any log, manifest or output: an S3 ingest through Ray with a planted secret."""

from __future__ import annotations

import os
import sys
import uuid

import boto3
import pyarrow.fs as pafs
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ingest_calls import ingest_rlds_ray  # noqa: E402
from rlds_factory import make_rlds_dataset  # noqa: E402

from distcur.data import steps_key  # noqa: E402
from distcur.sources.rlds_configs import OXE_DICT_ACTION, RLDSConfig  # noqa: E402
from distcur.store import Store  # noqa: E402

SECRET = f"planted-secret-{uuid.uuid4().hex}"
TOKEN = f"planted-token-{uuid.uuid4().hex}"
CONFIG = RLDSConfig(name="factory_rlds", state_keys=("observation/state",), action_keys=OXE_DICT_ACTION,
                    language_key="language_instruction", image_keys=("observation/image",), action_dim=7)


@pytest.fixture(scope="module")
def ray_with_secret(s3_server, request):
    """The secret and a session token in the driver's environment before Ray starts (so its
    workers inherit them, as local workers do); the moto server accepts any credentials."""
    old = {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    os.environ.update({"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN})
    yield request.getfixturevalue("ray_session")
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def occurrences(data: bytes) -> int:
    return data.count(SECRET.encode()) + data.count(TOKEN.encode())


def test_no_secret_in_store_outputs_or_ray_logs(ray_with_secret, s3_server, s3_bucket, tmp_path, capfd):
    ds = make_rlds_dataset(tmp_path / "rlds", num_episodes=2, num_shards=2)
    store = Store(f"{s3_bucket}/distcur")
    remote = f"{s3_bucket}/oxe/factory_rlds/1.0.0"
    pafs.copy_files(ds.path, remote[len("s3://"):], source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=store.fs)
    result = ingest_rlds_ray(remote, CONFIG, store, source="factory", progress=False)
    assert store.read_table(steps_key("factory")).num_rows == ds.num_steps == result.manifest.rows

    found: dict[str, int] = {}
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for obj in s3.list_objects_v2(Bucket=s3_bucket[len("s3://"):])["Contents"]:
        found[f"{s3_bucket}/{obj['Key']}"] = occurrences(s3.get_object(Bucket=s3_bucket[len("s3://"):],
                                                                        Key=obj["Key"])["Body"].read())
    session_dir = ray_with_secret._private.worker._global_node.get_session_dir_path()
    logs = 0
    for root in (tmp_path, session_dir):
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        found[path] = occurrences(f.read())
                    logs += path.endswith((".log", ".out", ".err"))
    out, err = capfd.readouterr()
    found["<stdout+stderr>"] = occurrences((out + err).encode())
    assert logs > 0 and any(k.endswith(".parquet") for k in found)  # the search did reach Ray's logs and data
    assert {k: n for k, n in found.items() if n} == {}
