"""Where a URI's bytes are: a local path or ``s3://bucket/prefix`` as a pyarrow filesystem.

The store (:mod:`distcur.store`) and the source readers (:mod:`distcur.sources`, which never see
the store) open their files through :func:`resolve`, so both reach the same S3 endpoint from the
same environment variables.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow.fs as pafs


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment (None: AWS's own endpoints)."""
    return (
        os.environ.get("DISTCUR_S3_ENDPOINT")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def _s3_filesystem(uri: str) -> pafs.S3FileSystem:
    """An S3 filesystem from the standard AWS variables, with an endpoint override.

    ``DISTCUR_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) points at an
    S3-compatible server; credentials and region come from the usual AWS variables.
    """
    endpoint = s3_endpoint()
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://bucket/prefix`` URI."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return _s3_filesystem(uri), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported store URI {uri!r}: expected a local path or s3://bucket/prefix")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
