"""Fixtures for tests that run real worker processes (see worker_harness)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _topic_prefix
from tests.integration.worker_harness import WorkerFactory


@pytest.fixture
def worker_factory(kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WorkerFactory]:
    """Start `byzguard run` processes for this test (own app id, config and topics); all reaped afterwards."""
    factory = WorkerFactory(kafka_bootstrap, tmp_path, _topic_prefix(request.node.name))
    try:
        yield factory
    finally:
        factory.cleanup()
