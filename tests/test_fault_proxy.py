"""The fault-injecting S3 proxy (tests/fault_proxy.py) gives real S3 errors to a real client."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from fault_proxy import FaultProxy, aws_endpoint, fault_proxy  # noqa: F401 - fixture

pytestmark = pytest.mark.s3


def _client(endpoint: str):
    import boto3
    from botocore.config import Config

    # retries off: botocore's "max_attempts" counts retries *after* the first try (1 → 2 requests),
    # "total_max_attempts" counts every request
    return boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"total_max_attempts": 1},
                                                                   connect_timeout=5, read_timeout=10))


@pytest.fixture
def bucket(fault_proxy, s3_endpoint):  # noqa: F811
    """A bucket with two objects, made directly on moto (not through the proxy)."""
    name = f"fault-{uuid.uuid4().hex[:12]}"
    direct = _client(s3_endpoint)
    direct.create_bucket(Bucket=name)
    direct.put_object(Bucket=name, Key="data/a.bin", Body=os.urandom(1000) + b"a")
    direct.put_object(Bucket=name, Key="data/b.bin", Body=b"b" * 5000)
    return name


def _error_code(exc) -> tuple[int, str]:
    return exc.value.response["ResponseMetadata"]["HTTPStatusCode"], exc.value.response["Error"]["Code"]


def test_cleared_rules_pass_requests_through_unchanged(fault_proxy, bucket, s3_endpoint):  # noqa: F811
    direct, proxied = _client(s3_endpoint), _client(fault_proxy.endpoint)
    for key in ("data/a.bin", "data/b.bin"):
        assert proxied.get_object(Bucket=bucket, Key=key)["Body"].read() == \
            direct.get_object(Bucket=bucket, Key=key)["Body"].read()
    proxied.put_object(Bucket=bucket, Key="data/c.bin", Body=b"\x00\xffwritten through the proxy")
    assert direct.get_object(Bucket=bucket, Key="data/c.bin")["Body"].read() == b"\x00\xffwritten through the proxy"
    stats = fault_proxy.stats()
    assert stats["requests"] == stats["passed"] == 3
    assert fault_proxy.injected == 0


def test_full_slowdown_gives_a_503_slowdown_client_error(fault_proxy, bucket):  # noqa: F811
    from botocore.exceptions import ClientError

    fault_proxy.set(slowdown=1.0)
    client = _client(fault_proxy.endpoint)
    for _ in range(3):
        with pytest.raises(ClientError) as exc:
            client.get_object(Bucket=bucket, Key="data/a.bin")
        assert _error_code(exc) == (503, "SlowDown")
    assert fault_proxy.stats()["slowdown"] == 3
    fault_proxy.clear()
    assert fault_proxy.stats()["slowdown"] == 0
    assert client.get_object(Bucket=bucket, Key="data/b.bin")["Body"].read() == b"b" * 5000
    stats = fault_proxy.stats()
    assert (stats["requests"], stats["passed"], stats["slowdown"]) == (1, 1, 0)


def test_internal_error_rule_gives_500(fault_proxy, bucket):  # noqa: F811
    from botocore.exceptions import ClientError

    fault_proxy.set(internal_error=1.0)
    with pytest.raises(ClientError) as exc:
        _client(fault_proxy.endpoint).get_object(Bucket=bucket, Key="data/a.bin")
    assert _error_code(exc) == (500, "InternalError")
    assert fault_proxy.stats()["internal_error"] == 1


def test_outage_fails_matching_keys_only_until_its_deadline(fault_proxy, bucket):  # noqa: F811
    from botocore.exceptions import ClientError

    client = _client(fault_proxy.endpoint)
    fault_proxy.set(outage_keys=["data/a.bin"], outage_s=2.0)
    deadline = fault_proxy._rules["outage_until"]
    for _ in range(2):
        with pytest.raises(ClientError) as exc:
            client.get_object(Bucket=bucket, Key="data/a.bin")
        assert _error_code(exc) == (503, "SlowDown")
        assert client.get_object(Bucket=bucket, Key="data/b.bin")["Body"].read() == b"b" * 5000
    assert fault_proxy.stats()["outage"] == 2
    time.sleep(max(0.0, deadline - time.time()) + 0.2)
    assert client.get_object(Bucket=bucket, Key="data/a.bin")["Body"].read().endswith(b"a")
    assert fault_proxy.stats()["outage"] == 2


def test_latency_is_added_to_every_request(fault_proxy, bucket):  # noqa: F811
    client = _client(fault_proxy.endpoint)
    client.head_object(Bucket=bucket, Key="data/a.bin")  # connection set up before measuring
    fault_proxy.set(latency_ms=300)
    for _ in range(2):
        start = time.perf_counter()
        client.head_object(Bucket=bucket, Key="data/a.bin")
        assert time.perf_counter() - start >= 0.3
    assert fault_proxy.stats()["delayed"] == 2


def test_dropped_connections_raise_a_connection_error(fault_proxy, bucket):  # noqa: F811
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    fault_proxy.set(drop=1.0)
    client = _client(fault_proxy.endpoint)
    with pytest.raises((BotoConnectionError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError)):
        client.get_object(Bucket=bucket, Key="data/a.bin")
    assert fault_proxy.stats()["drop"] == 1


def test_seeded_faults_are_reproducible(fault_proxy, bucket):  # noqa: F811
    from botocore.exceptions import ClientError

    client = _client(fault_proxy.endpoint)

    def pattern() -> list[bool]:
        fault_proxy.set(slowdown=0.5, seed=1234)
        out = []
        for _ in range(12):
            try:
                client.head_object(Bucket=bucket, Key="data/a.bin")
                out.append(True)
            except ClientError:
                out.append(False)
        return out

    first = pattern()
    fault_proxy.clear()
    assert pattern() == first and 0 < sum(first) < 12
    assert fault_proxy.stats()["slowdown"] == 12 - sum(first)


def test_env_points_aws_endpoint_at_the_proxy_and_restores_it(fault_proxy, s3_endpoint):  # noqa: F811
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    with fault_proxy.env() as url:
        assert os.environ["AWS_ENDPOINT_URL"] == url == fault_proxy.endpoint
        import boto3

        assert boto3.client("s3").meta.endpoint_url == fault_proxy.endpoint
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    with aws_endpoint("http://127.0.0.1:1"):
        pass
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint


def test_only_loopback_upstreams_and_unknown_rules_are_refused(fault_proxy):  # noqa: F811
    with pytest.raises(ValueError, match="127.0.0.1"):
        FaultProxy("http://example.com:80")
    with pytest.raises(ValueError, match="unknown fault rules"):
        fault_proxy.set(slowness=1)
    with pytest.raises(ValueError, match="probability"):
        fault_proxy.set(drop=2)


def test_stop_ends_the_started_process(s3_endpoint):
    proxy = FaultProxy(s3_endpoint).start()
    proc = proxy._proc
    assert proc.poll() is None
    proxy.close()
    assert proc.poll() is not None
    proxy.close()  # idempotent
