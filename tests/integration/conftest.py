"""Real parts for the integration tier: a local Ray instance (2 CPUs) and a fresh bucket per test; the moto S3 server
and MLflow server fixtures live in tests/conftest.py (the e2e tier uses them too).

The S3 settings go into the environment before Ray starts, so Ray's workers reach the same endpoint with the same
(dummy) credentials through the standard AWS chain, as they would in production.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def bucket(make_bucket: Callable[[str], str]) -> str:
    """A fresh bucket for one test."""
    return make_bucket(f"dlmoe-{uuid.uuid4().hex[:12]}")
