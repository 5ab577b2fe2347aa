"""A real S3 endpoint for tests: one moto server per session on a free local port, a fresh bucket per test.

Test modules import the fixtures they use: `from tests.s3_server import s3_bucket, s3_endpoint, s3_options`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# Set before any botocore client exists: never probe the EC2 metadata address for credentials.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint: str) -> dict[str, Any]:
    """s3fs options with moto's test credentials, as a config would give them (plus the secrets env would)."""
    return {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": s3_endpoint,
        "client_kwargs": {"region_name": "eu-west-1"},  # us-east-1 would need no LocationConstraint
    }


@pytest.fixture
def s3_bucket(s3_options: dict[str, Any]) -> str:
    """s3://NAME of a new empty bucket."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_options).mkdir(name)
    return f"s3://{name}"
