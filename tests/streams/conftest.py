"""Fixtures for tests against the real broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.streams.harness import Worker, new_prefix


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests never see each other's events."""
    return new_prefix()


@pytest.fixture
def start_worker(kafka_broker: str, prefix: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start ``python -m streams worker`` processes; all are stopped (by pid) afterwards."""
    workers: list[Worker] = []

    def start(wait: bool = True, **env: str) -> Worker:
        worker = Worker(kafka_broker, prefix, tmp_path, env_extra=env)
        workers.append(worker)
        return worker.start(wait=wait)

    yield start
    for worker in workers:
        worker.stop()
