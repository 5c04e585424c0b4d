"""Real parts for the integration tier: a moto S3 server on 127.0.0.1 and a local Ray instance (2 CPUs); the MLflow
server fixture lives in tests/conftest.py (the e2e tier uses it too).

The S3 settings go into the environment before Ray starts, so Ray's workers reach the same endpoint with the same
(dummy) credentials through the standard AWS chain, as they would in production.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from data_pipeline.local_s3 import create_bucket, local_s3_server


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def make_bucket(s3_endpoint: str) -> Callable[[str], str]:
    def make(name: str) -> str:
        create_bucket(s3_endpoint, name)
        return name

    return make


@pytest.fixture
def bucket(make_bucket: Callable[[str], str]) -> str:
    """A fresh bucket for one test."""
    return make_bucket(f"dlmoe-{uuid.uuid4().hex[:12]}")
