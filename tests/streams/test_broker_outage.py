"""A broker outage: the worker keeps running, says so, and resumes without loss."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.streams.harness import ROOT, Worker, labelled, new_prefix, produce, run, wait_until

KAFKA = ROOT / "deploy" / "kafka" / "kafka.sh"
PORT, CONTROLLER_PORT = 19192, 19193  # a broker of this test's own, not the suite's


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    env = {**os.environ, "KAFKA_PORT": str(PORT), "KAFKA_CONTROLLER_PORT": str(CONTROLLER_PORT),
           "KAFKA_HOME_DIR": str(tmp_path / "kafka"),
           "KAFKA_LIBS_DIR": str(ROOT / ".local" / "kafka" / "libs"), "KAFKA_HEAP": "256m"}
    started = subprocess.run([str(KAFKA), "start"], env=env, capture_output=True, text=True,
                             timeout=180)
    assert started.returncode == 0, started.stderr
    try:
        yield f"127.0.0.1:{PORT}", env
    finally:
        subprocess.run([str(KAFKA), "stop"], env=env, capture_output=True, timeout=120)


def test_worker_rides_out_a_broker_outage(own_broker, tmp_path):
    broker, env = own_broker
    prefix = new_prefix()
    worker = Worker(broker, prefix, tmp_path).start()
    mv = {"model": "fraud", "version": "0"}
    try:
        run(produce(broker, labelled(prefix, range(1000))))
        wait_until(lambda: worker.value("driftwarden_outcomes_total", **mv) == 1000, 60,
                   "1,000 outcomes before the outage")
        pid = worker.proc.pid

        stop = subprocess.run([str(KAFKA), "stop"], env=env, capture_output=True, timeout=120)
        assert stop.returncode == 0
        wait_until(lambda: worker.value("driftwarden_broker_up") == 0, 30,
                   "driftwarden_broker_up to drop to 0")
        assert worker.value("driftwarden_outcomes_total", **mv) == 1000  # state still served
        assert worker.log_text().count("Kafka unreachable at") == 1

        start = subprocess.run([str(KAFKA), "start"], env=env, capture_output=True,
                               text=True, timeout=180)
        assert start.returncode == 0, start.stderr
        wait_until(lambda: worker.value("driftwarden_broker_up") == 1, 60,
                   "driftwarden_broker_up back to 1")
        run(produce(broker, labelled(prefix, range(1000, 2000))))
        wait_until(lambda: worker.value("driftwarden_outcomes_total", **mv) == 2000, 120,
                   "2,000 outcomes after the outage")
        assert worker.value("driftwarden_predictions_total", **mv) == 2000
        assert worker.proc.poll() is None and worker.proc.pid == pid
    finally:
        worker.stop()
