"""Fixtures for tests against the real broker."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.streams.harness import Worker, new_prefix


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect each test's garbage as it ends, a resource it leaked (an event loop left
    unclosed, its sockets) then reported as a warning of that test. Collected at random
    later, under ``filterwarnings = error``, such a leak failed whichever test the
    collector ran in: in two CI runs, ``test_state_survives_kill_9_exactly`` (once at its
    teardown, once in a run whose own assertions had passed), on an event loop and two
    sockets some earlier test left open."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("default", ResourceWarning)
        gc.collect()


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
