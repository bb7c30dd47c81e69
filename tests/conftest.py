"""Session-wide: the real Kafka broker every integration test talks to."""

from __future__ import annotations

import os
import socket

import pytest

BROKER = os.environ.get("DRIFTWARDEN_TEST_BROKER", "127.0.0.1:9092")


@pytest.fixture(scope="session")
def kafka_broker() -> str:
    """``host:port`` of the local broker; fails (never skips) when it is not running."""
    host, port = BROKER.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        pytest.fail(
            f"Kafka broker not reachable at {BROKER} ({exc}). Run the suite with `make test`, "
            "which starts it, or start it with `make kafka-start`.",
            pytrace=False,
        )
    return BROKER
