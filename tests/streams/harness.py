"""Test harness for the real broker: worker processes, producing, reading, scraping."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from models.columns import OutcomeRun
from models.join import ModelRecord, decode_records, outcome_records
from models.simulation import Scenario, simulate
from streams.bench_e2e import free_port
from tests.streams.oracle import Expected

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def new_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}."


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``check`` until it returns a truthy value; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
        last = check()
    return last


@dataclass
class Worker:
    """One ``python -m streams worker`` process with its own ports and log."""

    broker: str
    prefix: str
    log_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    metrics_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DRIFTWARDEN_BROKER": f"kafka://{self.broker}",
            "DRIFTWARDEN_TOPIC_PREFIX": self.prefix,
            "DRIFTWARDEN_METRICS_PORT": str(self.metrics_port),
            "DRIFTWARDEN_DATA_DIR": str(self.log_dir / f"data-{self.web_port}"),
            **self.env_extra,
        }

    def start(self, wait: bool = True) -> Worker:
        self.log_path = self.log_dir / f"worker-{self.web_port}.log"
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams", "worker", "-l", "info",
                 "--web-port", str(self.web_port)],
                cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_ready()
        return self

    def log_text(self) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()[-3000:]}")
            return "[^Worker]: Ready" in self.log_text()
        wait_until(ready, timeout, "the worker to be ready")

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples by (name, sorted labels)."""
        out = {}
        for family in text_string_to_metric_families(self.scrape()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.metrics().items() if n == name)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for (n, labels), v in self.metrics().items():
            if n == name:
                key = dict(labels)[label]
                out[key] = out.get(key, 0.0) + v
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def exported(workers: list[Worker], models: list[str]) -> dict[str, dict[str, float]] | None:
    """Per model, what the live workers export: outcomes and cumulative accuracy (the
    model stage) and predictions (the join, summed over its partitions). None while a
    model is exported by no worker or its outcomes by more than one (a rebalance is
    under way)."""
    seen: dict[str, dict[str, float]] = {}
    for worker in workers:
        if worker.proc is None or worker.proc.poll() is not None:
            continue
        try:
            samples = worker.metrics()
        except (OSError, urllib.error.URLError):
            return None
        for (name, labels), value in samples.items():
            lab = dict(labels)
            model = lab.get("model")
            if model not in models:
                continue
            if name == "driftwarden_outcomes_total":
                if "outcomes" in seen.get(model, {}):
                    return None  # exported twice
                seen.setdefault(model, {})["outcomes"] = value
            elif name == "driftwarden_accuracy" and lab.get("window") == "cumulative":
                seen.setdefault(model, {})["accuracy"] = value
            elif name == "driftwarden_predictions_total":  # per join partition: a sum
                entry = seen.setdefault(model, {})
                entry["predictions"] = entry.get("predictions", 0.0) + value
    return seen if set(seen) == set(models) else None


def settle(workers: list[Worker], expected: Expected, models: list[str], what: str) -> None:
    """Wait until the live workers export exactly the oracle's outcomes and predictions,
    each model once; then check cumulative accuracy and pending labels. On a timeout
    the failure carries what is exported and the workers' log tails (which of them owns
    what, and whether a model stage or a rebalance went wrong)."""
    def done() -> dict[str, dict[str, float]] | None:
        seen = exported(workers, models)
        return seen if seen is not None and all(
            seen[m].get("outcomes") == expected.outcomes[m]
            and seen[m].get("predictions") == expected.predictions[m] for m in models) else None

    try:
        seen = wait_until(done, 180, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; exported: {exported(workers, models)}, expected "
                             f"outcomes: {dict(expected.outcomes)}; "
                             f"{report(workers)}") from None
    for m in models:
        assert seen[m]["accuracy"] == expected.correct[m] / expected.outcomes[m], (m, seen[m])
    assert sum(w.total("driftwarden_pending_labels") for w in workers) == expected.pending


def retraining_ids(broker: str, prefix: str) -> Counter[str]:
    """Ids of the events on the ``retraining`` topic, with how often each appears."""
    return Counter(orjson.loads(r.value)["id"]
                   for r in run(read_topic(broker, prefix + "retraining", idle=3.0)))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def produce(broker: str, records: Iterable[tuple[str, bytes | None, bytes]],
                  throttle: float = 0.0, **options: Any) -> int:
    """Produce (topic, key, value) records in order; ``throttle`` = records per second;
    ``options`` go to the AIOKafkaProducer."""
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=10, acks="all",
                                max_request_size=4 * 1024 * 1024, enable_idempotence=True,
                                **options)
    await producer.start()
    n = 0
    started = time.monotonic()
    try:
        for topic, key, value in records:
            await producer.send(topic, value, key=key)
            n += 1
            if throttle and n % 500 == 0:
                ahead = n / throttle - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await producer.flush()
    finally:
        await producer.stop()
    return n


def scenario_records(prefix: str, scenario: Scenario) -> Iterable[tuple[str, bytes, bytes]]:
    for ev in simulate(scenario):
        yield prefix + ev.topic, ev.key.encode(), orjson.dumps(ev.value)


async def read_topic(broker: str, topic: str, idle: float = 3.0) -> list[Any]:
    """Every record of ``topic`` from the beginning, until nothing arrives for ``idle`` s."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    out = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle * 1000))
            if not batch:
                return out
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()


def report(workers: list[Worker]) -> str:
    """For a failure message: what the broker holds (``where``), then each worker's exit
    code (None while it runs) and log tail."""
    logs = "\n".join(f"--- worker {i} (exit code {w.proc and w.proc.poll()}) ---\n"
                     f"{w.log_text()[-4000:]}" for i, w in enumerate(workers))
    return f"{where(workers[0])}\n{logs}"


def where(worker: Worker) -> str:
    """What the broker holds of a failed settle: outcomes per model on the records topic,
    and the partitions not committed to their end (or why they could not be read)."""
    try:
        return (f"on the records topic: {run(outcomes_on_records(worker.broker, worker.prefix))}"
                f"; not committed to the end: {run(uncommitted(worker.broker, worker.prefix))}")
    except Exception as exc:  # the failure being reported matters more than this
        return f"the broker could not be read: {exc!r}"


async def outcomes_on_records(broker: str, prefix: str) -> dict[str, int]:
    """Per model, the distinct outcomes the join wrote to the records topic: tells a
    join that lost outcomes from a model stage that did."""
    seen: dict[str, set[tuple[str, tuple[int, int]]]] = {}
    for msg in await read_topic(broker, prefix + "driftwarden-model-records", idle=3.0):
        model = msg.key.decode()
        for item in decode_records(model, msg.value):
            records = outcome_records(model, item) if isinstance(item, OutcomeRun) else [item]
            seen.setdefault(model, set()).update(
                (r.source, tuple(r.position)) for r in records
                if isinstance(r, ModelRecord) and r.kind == "o")
    return {model: len(positions) for model, positions in sorted(seen.items())}


async def uncommitted(broker: str, prefix: str) -> list[str]:
    """``group topic[partition] committed/end`` for every partition a consumer group of
    ``prefix`` has not committed to its end."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker)
    await admin.start()
    await consumer.start()
    out = []
    try:
        for group, _ in await admin.list_consumer_groups():
            if not group.startswith(prefix):
                continue
            committed = await admin.list_consumer_group_offsets(group)
            ends = await consumer.end_offsets(list(committed)) if committed else {}
            out += [f"{group} {tp.topic}[{tp.partition}] {meta.offset}/{ends[tp]}"
                    for tp, meta in sorted(committed.items()) if meta.offset != ends[tp]]
    finally:
        await consumer.stop()
        await admin.close()
    return out


def all_committed(broker: str, prefix: str, timeout: float = 60.0) -> None:
    """Wait until every consumer group of ``prefix`` has committed every partition it
    reads to its end (a commit held back shows as consumer lag that never clears, and is
    read again at the next start); on a timeout, name the partitions behind."""
    behind: list[str] = []

    def check() -> bool:
        behind[:] = run(uncommitted(broker, prefix))
        return not behind

    try:
        wait_until(check, timeout, "every consumer group to commit to the end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {behind}") from None


async def group_lag(broker: str, group: str, topics: list[str]) -> int:
    """Messages of ``topics`` the consumer ``group`` has not committed yet."""
    committed, ends = await group_offsets(broker, group, topics)
    return sum(end - committed[tp] for tp, end in ends.items())


async def group_offsets(broker: str, group: str, topics: list[str]
                        ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """(committed, end) offset of each partition of ``topics`` for the consumer ``group``
    (0 committed where it has committed nothing)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        tps = [TopicPartition(d["topic"], p["partition"])
               for d in await admin.describe_topics(topics) for p in d["partitions"]]
        if not tps:
            raise AssertionError(f"no partitions for {topics}")
        ends = await consumer.end_offsets(tps)
        return ({tp: max(0, committed[tp].offset if tp in committed else 0) for tp in tps},
                ends)
    finally:
        await consumer.stop()
        await admin.close()


async def create_topics(broker: str, partitions: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, n, 1) for t, n in partitions.items()])
    finally:
        await admin.close()


def wrong(ids: Collection[int]) -> Callable[[int], int]:
    """The ``label`` of :func:`labelled` that is right but for ``ids``."""
    return lambda i: 1 - i % 2 if i in ids else i % 2


def labelled(prefix: str, ids: range, model: str = "fraud",
             label: Callable[[int], int] = lambda i: i % 2) -> list[tuple[str, bytes, bytes]]:
    """A prediction (of ``i % 2``) and its label for each ``i``, as records to produce."""
    out = []
    for i in ids:
        event_id = f"{model}-{i}"
        out.append((prefix + "predictions", event_id.encode(), orjson.dumps(
            {"id": event_id, "model": model, "features": {"x": float(i)},
             "prediction": i % 2})))
        out.append((prefix + "labels", event_id.encode(),
                    orjson.dumps({"id": event_id, "label": label(i)})))
    return out
