"""Shared fixtures: a real S3 endpoint (moto's server mode on loopback) and store URLs.

The S3 server is a separate HTTP server thread, reachable from subprocesses and Ray workers
through the ``AWS_*`` environment variables this fixture sets for the whole session.
"""

from __future__ import annotations

import os
import uuid

import pytest

S3_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1; AWS_* variables point boto3/obstore/zarr at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV_KEYS}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing"})
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(k, None)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store_url(s3_bucket):
    return f"s3://{s3_bucket}/store"


@pytest.fixture
def local_store_url(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def store_url(request):
    """Run a test once against a local directory and once against the moto S3 endpoint."""
    if request.param == "local":
        return request.getfixturevalue("local_store_url")
    return request.getfixturevalue("s3_store_url")


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """A local Ray instance for in-process jobs, started after the S3 server so that Ray's worker
    processes inherit the AWS_* variables. Module-scoped: one start-up per test module."""
    import ray

    from ray_jobs.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
