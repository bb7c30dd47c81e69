"""A broker outage: the worker keeps running, says so, and resumes without loss.

The broker is stopped for 20 s in the middle of a 100,000-event stream that a producer
keeps publishing throughout (its sends wait for the broker to come back); afterwards the
worker's counts equal the oracle's (``tests/streams/oracle.py``) exactly.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.simulation import Scenario
from tests.streams.harness import ROOT, Worker, new_prefix, produce, run, wait_until
from tests.streams.oracle import merged, oracle, records

KAFKA = ROOT / "deploy" / "kafka" / "kafka.sh"
PORT, CONTROLLER_PORT = 19192, 19193  # a broker of this test's own, not the suite's
START = float(int(time.time()))
MODELS = ("fraud", "churn")


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


def kafka(command: str, env: dict[str, str]) -> None:
    done = subprocess.run([str(KAFKA), command], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr


def test_worker_rides_out_a_20_second_broker_outage_mid_stream(own_broker, tmp_path):
    broker, env = own_broker
    prefix = new_prefix()
    # 51,400 predictions, 5% never labelled: 100,178 events.
    events = merged(Scenario(n=25_700, model=m, version="1", seed=30 + k, unlabelled=0.05,
                             rate=20.0, start_ts=START) for k, m in enumerate(MODELS))
    expected = oracle(events)
    assert len(events) == 100_178
    worker = Worker(broker, prefix, tmp_path).start()
    pid = worker.proc.pid
    outage: dict[str, float] = {}

    async def stream_with_an_outage() -> None:
        # 2,500 events/s: about 40 s of stream; the broker goes at 15 s, for 20 s.
        producing = asyncio.create_task(produce(
            broker, records(prefix, events), throttle=2500, request_timeout_ms=180_000))
        await asyncio.sleep(15.0)
        assert not producing.done()
        await asyncio.to_thread(kafka, "stop", env)
        outage["stopped"] = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: worker.value("driftwarden_broker_up") == 0,
                                30, "driftwarden_broker_up to drop to 0")
        outage["absorbed"] = worker.total("driftwarden_outcomes_total")
        await asyncio.sleep(20.0 - (time.monotonic() - outage["stopped"]))
        await asyncio.to_thread(kafka, "start", env)
        outage["restarted"] = time.monotonic()
        await producing

    try:
        run(stream_with_an_outage())
        assert outage["restarted"] - outage["stopped"] >= 20.0
        assert 0 < outage["absorbed"] < sum(expected.outcomes.values())  # mid-stream
        wait_until(lambda: worker.value("driftwarden_broker_up") == 1, 60,
                   "driftwarden_broker_up back to 1")
        wait_until(lambda: all(
            worker.value("driftwarden_outcomes_total", model=m, version="1")
            == expected.outcomes[m] for m in MODELS), 180, "every outcome after the outage")
        for m in MODELS:
            mv = {"model": m, "version": "1"}
            assert worker.value("driftwarden_predictions_total", **mv) == expected.predictions[m]
            assert worker.value("driftwarden_accuracy", window="cumulative", **mv) == (
                expected.correct[m] / expected.outcomes[m])
        assert worker.value("driftwarden_pending_labels") == expected.pending
        assert worker.proc.poll() is None and worker.proc.pid == pid
        assert worker.log_text().count("Kafka unreachable at") == 1  # once per outage
    finally:
        worker.stop()
