"""``python -m streams bench``: one worker end to end, against what Kafka can feed it.

Against the broker in ``DRIFTWARDEN_BROKER``, on fresh topics of its own:

1. **input**: N predictions (20 features: 16 numeric, 4 categorical; scores) and a label
   for each (published 500 predictions later, every tenth one wrong);
2. **ceiling**: a raw aiokafka consumer, ``getmany`` plus ``orjson.loads`` of every value,
   reads all of it; events/s. Then the **Faust floor**: a Faust worker built like
   driftwarden's whose agent does nothing (:mod:`streams.bench_floor`): what Faust's
   per-event machinery alone allows;
3. **worker**: ``python -m streams worker`` (join, performance, data drift, metrics: all
   on) over the same input, from just before its first event (:func:`input_start`) to
   its last absorbed outcome; events/s, its peak RSS (VmHWM), and the CPU its main
   thread, the whole worker and the machine used meanwhile (``/proc``: whether the
   worker waits, or is the wall). Then the same with the two stages in two processes
   (``DRIFTWARDEN_ROLE=join`` and ``monitor``), from just before the join's first event
   to the model stage's last outcome. Steps 2 and 3 run ``--repeat`` times; medians;
4. **latency**: a fresh worker fed at half the median worker rate; the time from a label's
   publication to the first scrape (every 50 ms) whose outcome count covers it; p50/p99,
   ``--repeat`` times (fresh topics and worker each time); medians. And the worker's CPU
   meanwhile: what an event costs at a steady rate, where batches are as small as the
   rate makes them, not over a backlog as in step 3;
5. **state**: bytes the join stores per pending prediction (key + value, as on the
   changelog), and the Python heap they take (tracemalloc), in-process; and the cost of
   ``models/`` per input event (join, model stage) over the step-1 input in-process:
   what the worker would cost with Faust and Kafka taken away;
6. **detection delay**: a worker fed a labelled stream (one partition, so that it sees
   the labels in publication order) whose error rate steps from 10% to 30% at outcome K;
   the retraining event's ``outcomes_seen - K``, beside river's ADWIN fed the same error
   sequence in-process.

Before step 1 the machine's busy cores are sampled for 3 s: above ``BUSY_BEFORE`` the
bench says that its numbers will suffer. (It does not see everything that does: a broker
holding many partitions is quiet until it is written to, yet on the development broker
after weeks of test runs, 15,446 partitions, p99 latency was five times a fresh
broker's: README, Performance.) Prints a table; ``--json`` adds one JSON object on the
last line.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import itertools
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from models import codec
from models.join import InputRecord, JoinPartition, decode_records, encode_records
from models.monitor import ModelState
from models.simulation import Scenario, WideScenario, simulate, simulate_wide
from streams.settings import Settings
from streams.topics import TopicNames, ensure_topics

__all__ = ["CpuTimes", "WorkerProcess", "add_arguments", "at_least", "bench", "bench_input",
           "cpu_use", "fresh_topics", "input_start", "print_table", "produce", "split_run",
           "start_split", "stream", "wait_until", "worker_run"]

LABEL_LAG = 500  # a label is published this many predictions after its prediction


def at_least(low: float, kind: type = int, most: float = math.inf) -> Any:
    """An argparse type: a number of ``kind`` of at least ``low`` (and at most ``most``;
    a bad one is a usage error naming the option, before anything runs)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value >= low:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:g}, got {text}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=at_least(1000), default=100_000,
                   help="predictions (each labelled)")
    p.add_argument("--repeat", type=at_least(1), default=3, help="ceiling and worker runs")
    p.add_argument("--latency-seconds", type=at_least(1.0, float), default=20.0,
                   help="length of each latency run")
    p.add_argument("--change-at", type=at_least(1), default=20_000,
                   help="outcome at which the error rate steps up (detection delay)")
    p.add_argument("--json", action="store_true", help="also print one JSON line")


def fresh_topics(kind: str) -> tuple[Settings, int]:
    """Settings from the environment with a topic prefix of their own (``<prefix><kind>-
    <random>.``), and the partition count of the topics :func:`ensure_topics` made."""
    base = Settings.from_env()
    settings = replace(base, topic_prefix=f"{base.topic_prefix}{kind}-{uuid.uuid4().hex[:8]}.")
    return settings, asyncio.run(ensure_topics(settings))


def bench_input(names: TopicNames, n: int, seed: int = 1) -> list[tuple[str, bytes, bytes]]:
    """Predictions and their labels, each label LABEL_LAG predictions behind."""
    return list(stream(names, n, seed=seed, start_ts=time.time() - n / 1000))


def stream(names: TopicNames, n: int, *, seed: int, start_ts: float, rate: float = 1000.0,
           unlabelled: float = 0.0) -> Iterator[tuple[str, bytes, bytes]]:
    """(topic, key, value) of ``n`` predictions at ``rate``/s from ``start_ts`` (event
    time), each followed LABEL_LAG predictions later by its label (every tenth one wrong)
    unless it is among the seeded ``unlabelled`` fraction. Generated lazily."""
    import numpy as np

    never = np.random.default_rng(seed + 1).random(n) < unlabelled
    labels: deque[tuple[str, bytes, bytes] | None] = deque()
    scenario = WideScenario(n=n, model="bench", seed=seed, start_ts=start_ts, rate=rate)
    for i, ev in enumerate(simulate_wide(scenario)):
        key = ev.key.encode()
        yield names.predictions, key, orjson.dumps(ev.value)
        p = ev.value["prediction"]
        labels.append(None if never[i] else (names.labels, key, orjson.dumps(
            {"id": ev.key, "label": 1 - p if i % 10 == 0 else p, "ts": ev.ts + 0.5})))
        if i >= LABEL_LAG and (label := labels.popleft()) is not None:
            yield label
    yield from (label for label in labels if label is not None)


async def produce(settings: Settings, records: Iterable[tuple[str, bytes, bytes]],
                  rate: float = 0.0, sent: list[float] | None = None) -> None:
    """Publish ``records`` (at ``rate``/s when given, appending each label's send time to
    ``sent``); raise unless every one was acknowledged.

    A batch the broker keeps refusing is dropped after the producer's request timeout and
    only its future says so: the bench once waited 540 s in CI for events that were never
    published (``NotLeaderForPartitionError`` on a fresh topic's partitions). The records
    of such batches are published again, by a new producer (aiokafka#1018: a producer can
    stay stuck on that error while a new one is not), up to ``PUBLISH_ATTEMPTS`` times.
    """
    todo: Iterable[tuple[str, bytes, bytes]] = records
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        lost = await _publish(settings, todo, rate, sent)
        if not lost:
            return
        (topic, _, _), exc = lost[0]
        why = f"{len(lost):,} record(s) to topic {topic!r} not acknowledged: {exc!r}"
        if attempt == PUBLISH_ATTEMPTS or not getattr(exc, "retriable", False):
            raise RuntimeError(f"bench: {why}")
        print(f"bench: {why}; publishing them again with a new producer", file=sys.stderr)
        todo, rate, sent = [record for record, _ in lost], 0.0, None


PUBLISH_ATTEMPTS = 3


async def _publish(settings: Settings, records: Iterable[tuple[str, bytes, bytes]],
                   rate: float, sent: list[float] | None,
                   ) -> list[tuple[tuple[str, bytes, bytes], BaseException]]:
    """One producer's pass over ``records``: those it could not deliver, with why."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5,
                                acks="all", max_batch_size=256 * 1024,
                                **settings.aiokafka_security())
    await producer.start()
    lost: list[tuple[tuple[str, bytes, bytes], BaseException]] = []

    def delivered(record: tuple[str, bytes, bytes]) -> Callable[[asyncio.Future[Any]], None]:
        def check(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled() and (exc := fut.exception()) is not None:
                lost.append((record, exc))
        return check

    try:
        started = time.monotonic()
        for i, record in enumerate(records):
            topic, key, value = record
            (await producer.send(topic, value, key=key)).add_done_callback(delivered(record))
            if sent is not None and topic.endswith("labels"):
                sent.append(time.monotonic())
            if rate and i % 100 == 99:
                ahead = (i + 1) / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await producer.flush()
        await asyncio.sleep(0)  # the records' futures are resolved: let their callbacks run
    finally:
        await producer.stop()
    return lost


async def _ceiling(settings: Settings, names: TopicNames, total: int) -> float:
    """Seconds a raw aiokafka consumer takes to fetch and decode ``total`` events."""
    # No group: aiokafka assigns every partition, read from the earliest offset.
    consumer = AIOKafkaConsumer(names.predictions, names.labels, group_id=None,
                                bootstrap_servers=settings.bootstrap_servers,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=1024 * 1024,
                                **settings.aiokafka_security())
    await consumer.start()
    try:
        seen = 0
        started = last = time.perf_counter()
        while seen < total:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                for rec in records:
                    orjson.loads(rec.value)
                seen += len(records)
            if batch:
                last = time.perf_counter()
            elif time.perf_counter() - last > 60:
                raise RuntimeError(f"bench: the ceiling read {seen:,} of {total:,} events "
                                   f"from {names.predictions!r} and {names.labels!r}, then "
                                   "nothing for 60 s")
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def print_table(rows: list[tuple[str, str]], value_width: int) -> None:
    """Print ``(measure, value)`` rows, measures left-aligned, values right-aligned."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value:>{value_width}}")


_PORT_TRIES = itertools.count()


def free_port() -> int:
    """A local TCP port that is free now and that no outgoing connection can take.

    ``bind(0)`` hands out a port from the kernel's ephemeral range, the range every
    outgoing connection draws its local port from. The Kafka clients of a test run open
    many, and one of them took such a port between the check and the worker's bind
    (``OSError: [Errno 98] ... address already in use`` in CI). Ports just below the
    range are never handed to outgoing connections; each call takes the next one that
    binds, starting at an offset set by the process id so that two processes rarely meet.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    span = min(10_000, low - 1024)
    start = os.getpid() * 7
    for _ in range(span):
        port = low - 1 - (start + next(_PORT_TRIES)) % span
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low - span}..{low - 1}")


class WorkerProcess:
    """A ``python -m streams worker`` subprocess (or another ``command`` built on the
    app, such as the Faust floor) and its metrics endpoint; ``cwd``, when given, is the
    directory it runs in (and imports ``command`` from first: ``streams.bench_compare``).
    Its standard error goes to :attr:`log`, which the error of a worker that exits names."""

    def __init__(self, settings: Settings, app_id: str,
                 command: Sequence[str] = ("streams", "worker", "-l", "warn"),
                 cwd: str | None = None, **env: str) -> None:
        self.port, web_port = free_port(), free_port()
        data_dir = os.path.abspath(f".local/bench/{app_id}")
        env = {**os.environ, **env, "DRIFTWARDEN_BROKER": settings.broker,
               "DRIFTWARDEN_TOPIC_PREFIX": settings.topic_prefix,
               "DRIFTWARDEN_APP_ID": app_id, "DRIFTWARDEN_METRICS_PORT": str(self.port),
               "DRIFTWARDEN_DATA_DIR": data_dir}
        os.makedirs(os.path.dirname(data_dir), exist_ok=True)
        self.log = f"{data_dir}.log"
        with open(self.log, "wb") as stderr:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *command, "--web-port", str(web_port)],
                env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr)

    def sample(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples (those with ``labels``); 0 until the endpoint answers."""
        return sum(self._samples(name, **labels))

    def assigned(self) -> bool:
        """Has the worker been given partitions (its consumer-lag series, every 5 s)?"""
        return bool(self._samples("driftwarden_consumer_lag"))

    def _samples(self, name: str, **labels: str) -> list[float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode} (its "
                                   f"standard error: {self.log})") from None
            return []
        return [s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == name
                and all(s.labels.get(k) == v for k, v in labels.items())]

    async def settled(self) -> None:
        """Wait until the worker is up and its group has settled, before a clock starts."""
        await asyncio.to_thread(wait_until, lambda: self.sample("driftwarden_broker_up") == 1, 180,
                                "the worker")
        await asyncio.sleep(10.0)

    def peak_rss(self) -> int:
        return self._status("VmHWM")

    def rss(self) -> int:
        return self._status("VmRSS")

    def _status(self, field: str) -> int:
        """A memory figure of /proc/<pid>/status, in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic()


def wait_count(worker: WorkerProcess, metric: str, n: float, started: float,
               timeout: float, **labels: str) -> float:
    """When ``metric`` reached ``n``, within 50 ms, with few scrapes on the way.

    A scrape of the worker's metrics costs it ~4 ms of its interpreter's time (the
    exposition and the process collector hold the GIL): scraping every 100 ms took ~4% of
    a busy worker. So the wait sleeps half the time the current rate needs to reach
    ``n`` (at most 1 s), and scrapes densely only near the end.
    """
    deadline = time.monotonic() + timeout
    while True:
        now, count = time.monotonic(), worker.sample(metric, **labels)
        if count >= n:
            return now
        if now > deadline:
            raise RuntimeError(f"bench: timed out after {timeout:.0f}s waiting for {n:,.0f} "
                               f"of {metric}")
        rate = count / max(now - started, 1e-3)
        time.sleep(min(1.0, max(0.05, (n - count) / rate / 2 if rate else 0.5)))


def input_start(join: WorkerProcess, *pids: int) -> tuple[float, list[CpuTimes]]:
    """The clock and the CPU times of ``pids`` just before the join's last scrape that
    answered with no input event received yet: from there a window holds all of the
    join's work on the input, and at most one poll (20 ms) and a scrape of waiting.

    (The first event *consumed* comes once the first batch's writes are acknowledged:
    measuring from it left that batch out of the clock, and on a small input all of the
    join's work.)
    """
    deadline = time.monotonic() + 180
    last: tuple[float, list[CpuTimes]] | None = None
    while True:
        mark = time.monotonic(), [CpuTimes.read(pid) for pid in pids]
        received = join._samples("driftwarden_events_received_total")
        if received and sum(received) > 0:
            if last is None:
                raise RuntimeError("bench: the join received input before its first scrape "
                                   "answered; the clock cannot start before its first event")
            return last
        if received:
            last = mark
        if time.monotonic() > deadline:
            raise RuntimeError("bench: timed out after 180s waiting for the join's first event")
        time.sleep(0.02)


class CpuTimes(NamedTuple):
    """CPU seconds so far (user + system): a process's main thread, the whole process,
    and the machine (busy, and busy + idle: the wall clock times its cores)."""

    main: float
    process: float
    machine_busy: float
    machine_all: float

    @classmethod
    def read(cls, pid: int) -> CpuTimes:
        tick = os.sysconf("SC_CLK_TCK")

        def used(path: str) -> float:  # utime + stime of a /proc stat file
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick

        with open("/proc/stat") as f:  # user nice system idle iowait irq softirq steal
            jiffies = [int(x) for x in f.readline().split()[1:9]]
        busy = sum(jiffies) - jiffies[3] - jiffies[4]
        return cls(used(f"/proc/{pid}/task/{pid}/stat"), used(f"/proc/{pid}/stat"),
                   busy / tick, sum(jiffies) / tick)


def cpu_use(before: CpuTimes, after: CpuTimes, seconds: float, events: int) -> dict[str, float]:
    """What a run used, per second of wall clock (cores) and per event."""
    d = CpuTimes(*(b - a for a, b in zip(before, after, strict=True)))
    return {"main_thread_busy": d.main / seconds,
            "main_thread_seconds_per_event": d.main / events,
            "process_cores": d.process / seconds,
            "machine_busy_cores": d.machine_busy / seconds,
            "machine_cores": d.machine_all / seconds}


def worker_run(settings: Settings, n: int, run: int, cwd: str | None = None,
                **env: str) -> tuple[float, int, float, dict[str, float]]:
    """Events/s of one worker over the whole input, its peak RSS, the seconds from the
    join's last input event (prediction or label) to the model stage's last outcome, and
    the CPU it and the machine used meanwhile (:func:`cpu_use`). ``cwd`` and ``env``: as
    for :class:`WorkerProcess`."""
    worker = WorkerProcess(settings, f"bench-{run}", cwd=cwd, **env)
    try:
        started, (before,) = input_start(worker, worker.proc.pid)
        joined = max(wait_count(worker, "driftwarden_events_consumed_total", n, started, 1800,
                                topic=topic) for topic in ("predictions", "labels"))
        done = wait_count(worker, "driftwarden_outcomes_total", n, started, 1800)
        cpu = cpu_use(before, CpuTimes.read(worker.proc.pid), done - started, 2 * n)
        return 2 * n / (done - started), worker.peak_rss(), done - joined, cpu
    finally:
        worker.stop()


def start_split(settings: Settings, app_id: str, started: list[WorkerProcess],
                cwd: str | None = None, **env: str) -> tuple[WorkerProcess, WorkerProcess]:
    """Start the two roles (``DRIFTWARDEN_ROLE``) of ``app_id``: the model stage first,
    and the join once the model stage has its partitions, so that what is measured from
    the join's first event does not include the model stage's start-up. Each process is
    appended to ``started`` as it starts (for the caller to stop); returns (join,
    model stage)."""
    monitor = WorkerProcess(settings, app_id, cwd=cwd, DRIFTWARDEN_ROLE="monitor", **env)
    started.append(monitor)
    wait_until(monitor.assigned, 180, "the model stage's partitions")
    join = WorkerProcess(settings, app_id, cwd=cwd, DRIFTWARDEN_ROLE="join", **env)
    started.append(join)
    return join, monitor


def split_run(settings: Settings, n: int, run: int, cwd: str | None = None,
               **env: str) -> tuple[float, dict[str, dict[str, float]], dict[str, int]]:
    """Events/s of the two roles side by side over the whole input (a join process and a
    model-stage process, ``DRIFTWARDEN_ROLE``), from the join's first consumed event to
    the model stage's last absorbed outcome, the CPU each used (:func:`cpu_use`), and
    each one's peak RSS. ``cwd`` and ``env``: as for :class:`WorkerProcess`."""
    workers: list[WorkerProcess] = []
    try:
        join, monitor = start_split(settings, f"bench-split-{run}", workers, cwd, **env)
        started, before = input_start(join, join.proc.pid, monitor.proc.pid)
        done = wait_count(monitor, "driftwarden_outcomes_total", n, started, 1800)
        after = [CpuTimes.read(w.proc.pid) for w in (join, monitor)]
        cpu = {role: cpu_use(b, e, done - started, 2 * n)
               for role, b, e in zip(("join", "monitor"), before, after, strict=True)}
        rss = {"join": join.peak_rss(), "monitor": monitor.peak_rss()}
        return 2 * n / (done - started), cpu, rss
    finally:
        for worker in workers:
            worker.stop()


def _floor_run(settings: Settings, n: int, run: int) -> float:
    """Events/s of a Faust worker whose agent does nothing (:mod:`streams.bench_floor`)."""
    out = f".local/bench/floor-{run}.out"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        os.remove(out)
    worker = WorkerProcess(settings, f"bench-floor-{run}",
                           command=("streams.bench_floor", str(2 * n), out))
    try:
        wait_until(lambda: os.path.exists(out), 1800,
                   "the Faust floor worker", interval=0.1)
        with open(out) as f:
            events, seconds = f.read().split()
        return int(events) / float(seconds)
    finally:
        worker.stop()


async def _latency(settings: Settings, rate: float,
                   seconds: float) -> tuple[list[float], dict[str, float]]:
    """Label-to-absorbed latencies (s) of a stream at ``rate`` events/s, and the CPU the
    worker used from the first event published to the last outcome absorbed
    (:func:`cpu_use`): what an event costs at a steady rate, in batches as small as the
    rate makes them, rather than over a backlog."""
    n = int(rate * seconds / 2)
    names = TopicNames.from_settings(settings)
    records = bench_input(names, n, seed=2)
    worker = WorkerProcess(settings, "bench-latency")
    sent: list[float] = []
    absorbed: list[tuple[float, float]] = []  # (time, outcomes)
    try:
        await worker.settled()

        async def scrape() -> None:
            while not absorbed or absorbed[-1][1] < n:
                value = await asyncio.to_thread(worker.sample, "driftwarden_outcomes_total")
                absorbed.append((time.monotonic(), value))
                await asyncio.sleep(0.05)

        scraping = asyncio.create_task(scrape())
        before, started = CpuTimes.read(worker.proc.pid), time.monotonic()
        await produce(settings, records, rate=rate, sent=sent)
        await asyncio.wait_for(scraping, timeout=600)
        cpu = cpu_use(before, CpuTimes.read(worker.proc.pid), time.monotonic() - started, 2 * n)
    finally:
        worker.stop()
    counts = [c for _, c in absorbed]
    out = []
    for j, t_sent in enumerate(sent):
        k = bisect.bisect_left(counts, j + 1)  # first scrape covering label j
        if k < len(absorbed) and t_sent > sent[0] + 2.0:  # skip the first 2 s: warm-up
            out.append(absorbed[k][0] - t_sent)
    return out, cpu


def machine_busy(seconds: float = 3.0) -> float:
    """Cores the machine keeps busy over ``seconds`` (all processes; this one sleeps)."""
    before = CpuTimes.read(os.getpid())
    time.sleep(seconds)
    return cpu_use(before, CpuTimes.read(os.getpid()), seconds, 1)["machine_busy_cores"]


#: Machine busy before the bench (cores) above which it says the numbers will suffer.
BUSY_BEFORE = 0.2


def _stages(records: list[tuple[str, bytes, bytes]], names: TopicNames,
            batch: int = 1000) -> tuple[float, float]:
    """Seconds per input event spent in ``models/`` by (the join, the model stage),
    in-process, in batches as the worker takes them: the worker's cost without Faust
    and Kafka. The model stage's input goes through orjson as on the records topic, and
    the collector is set as in the worker (``keep_gc_off_the_event_path``); without that,
    full collections over the bench's own 400,000 input objects cost a third more."""
    from streams.cli import keep_gc_off_the_event_path  # cli imports this module

    threshold = gc.get_threshold()
    keep_gc_off_the_event_path()
    try:
        return _stages_timed(records, names, batch)
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _stages_timed(records: list[tuple[str, bytes, bytes]], names: TopicNames,
                  batch: int) -> tuple[float, float]:
    settings = Settings()
    logical = {names.predictions: "predictions", names.labels: "labels"}
    part = JoinPartition({}, 0, settings.label_ttl_seconds)
    states: dict[str, ModelState] = {}
    offsets = {"predictions": 0, "labels": 0}
    join = model = 0.0
    for start in range(0, len(records), batch):
        # As the batch route hands a fetch over: Kafka records, predictions first.
        now = round(time.time() * 1000)
        inputs: dict[str, list[InputRecord]] = {"predictions": [], "labels": []}
        for topic, key, value in records[start:start + batch]:
            name = logical[topic]
            inputs[name].append(InputRecord(offsets[name], now, key, value))
            offsets[name] += 1
        t0 = time.perf_counter()
        for name, taken in inputs.items():
            part.absorb_many(name, taken)
        part.expire()
        flush = part.drain()
        # As the worker sends them: the p records, then (after the write-ahead entry) the rest.
        messages = [encode_records(flush.early()[0]), encode_records(flush.outbox()[0])]
        t1 = time.perf_counter()
        for m, raw in (pair for message in messages for pair in message):
            state = states.setdefault(m, ModelState(m, settings.policies()))
            state.absorb_many(decode_records(m, raw))
        for state in states.values():
            codec.dumps(state)
        join += t1 - t0
        model += time.perf_counter() - t1
    return join / len(records), model / len(records)


def _state_bytes(n: int = 20_000, labelled: bool = False) -> tuple[float, float]:
    """(stored bytes, Python heap bytes) per pending prediction of the join, or with
    ``labelled`` per matched id (the marker the join keeps for a label TTL after a
    match, to catch a duplicate).

    Drained every 1,000 events as the worker does, so the heap figure is what the join
    keeps between batches: the entry (key and value objects, the table's dict slot) and
    its expiry-heap items."""
    names = TopicNames.from_settings(Settings())
    records = bench_input(names, n + LABEL_LAG)
    if not labelled:
        records = [r for r in records if r[0] == names.predictions][:n]
    store: dict[str, bytes] = {}
    part = JoinPartition(store, 0, 7 * 86400.0)
    offsets = {names.predictions: 0, names.labels: 0}
    topics = {names.predictions: "predictions", names.labels: "labels"}
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, (topic, key, raw) in enumerate(records):
        part.absorb(topics[topic], raw, offsets[topic], time.time(), key)
        offsets[topic] += 1
        if i % 1000 == 999:
            part.drain()
    part.drain()
    gc.collect()
    heap = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    entries = [(k, v) for k, v in store.items() if not k.startswith("\x00")]
    stored = sum(len(k.encode()) + len(v) for k, v in entries) / len(entries)
    return stored, heap / len(entries)


async def _detection(settings: Settings, change_at: int, rate: float) -> tuple[int, int]:
    """Outcomes past the change until (the service, standalone ADWIN) detected it."""
    from river import drift

    scenario = Scenario(n=int(change_at * 1.6), model="bench-drift", seed=3, error_before=0.1,
                        error_after=0.3, change_at=change_at, unlabelled=0.0,
                        label_delay=(0.0, 5.0), rate=100.0, start_ts=time.time() - 1000)
    names = TopicNames.from_settings(settings)
    topic = {"predictions": names.predictions, "labels": names.labels}
    events = list(simulate(scenario))
    adwin = drift.ADWIN()
    standalone = -1
    for i, err in enumerate(not e.correct for e in events if e.topic == "labels"):
        adwin.update(float(err))
        if adwin.drift_detected and i >= change_at:
            standalone = i + 1 - change_at
            break
    worker = WorkerProcess(settings, "bench-drift")
    try:
        await worker.settled()
        await produce(settings, [(topic[e.topic], e.key.encode(), orjson.dumps(e.value))
                                  for e in events], rate=rate)
        await asyncio.to_thread(
            wait_until, lambda: worker.sample("driftwarden_retraining_events_total") >= 1, 300,
            "the retraining event")
    finally:
        worker.stop()
    consumer = AIOKafkaConsumer(names.retraining, bootstrap_servers=settings.bootstrap_servers,
                                auto_offset_reset="earliest", group_id=None,
                                **settings.aiokafka_security())
    await consumer.start()
    try:
        rec = await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()
    return orjson.loads(rec.value)["evidence"]["outcomes_seen"] - change_at, standalone


def bench(a: argparse.Namespace) -> int:
    settings, partitions = fresh_topics("bench")
    names = TopicNames.from_settings(settings)
    print(f"bench: {a.events:,} predictions + {a.events:,} labels, 20 features, "
          f"{partitions} partitions, topics {settings.topic_prefix}*", flush=True)
    idle = machine_busy()
    print(f"  machine busy before the bench: {idle:.2f} cores", flush=True)
    if idle > BUSY_BEFORE:
        print(f"bench: the machine is already busy ({idle:.2f} cores, before any worker "
              "runs): every number below will be lower and noisier than on an idle one",
              file=sys.stderr, flush=True)
    records = bench_input(names, a.events)
    asyncio.run(produce(settings, records))
    total = 2 * a.events
    ceilings, floors, rates, rss, trails, splits = [], [], [], [], [], []
    cpus: list[dict[str, float]] = []
    split_cpus: list[dict[str, dict[str, float]]] = []
    split_rss: list[dict[str, int]] = []
    for run in range(a.repeat):
        ceilings.append(total / asyncio.run(_ceiling(settings, names, total)))
        floors.append(_floor_run(settings, a.events, run))
        rate, peak, trail, cpu = worker_run(settings, a.events, run)
        rates.append(rate)
        rss.append(peak)
        trails.append(trail)
        cpus.append(cpu)
        split, split_cpu, peaks = split_run(settings, a.events, run)
        splits.append(split)
        split_cpus.append(split_cpu)
        split_rss.append(peaks)
        print(f"  run {run + 1}: ceiling {ceilings[-1]:,.0f} ev/s, Faust floor "
              f"{floors[-1]:,.0f} ev/s, worker {rate:,.0f} ev/s, join + model stage "
              f"processes {split:,.0f} ev/s", flush=True)
    ceiling, floor, rate, split = (statistics.median(x)
                                   for x in (ceilings, floors, rates, splits))
    cpu = {key: statistics.median(c[key] for c in cpus) for key in cpus[0]}
    split_cpu = {role: {key: statistics.median(c[role][key] for c in split_cpus)
                        for key in cpus[0]} for role in ("join", "monitor")}
    ratios = [r / c for r, c in zip(rates, ceilings, strict=True)]
    split_ratios = [r / c for r, c in zip(splits, ceilings, strict=True)]
    split_peak = {role: statistics.median(p[role] for p in split_rss)
                  for role in ("join", "monitor")}

    p50s, p99s = [], []
    steady_cpus: list[dict[str, float]] = []
    for run in range(a.repeat):
        latency_settings = replace(settings, topic_prefix=f"{settings.topic_prefix}lat{run}.")
        asyncio.run(ensure_topics(latency_settings))
        latencies, steady = asyncio.run(_latency(latency_settings, rate / 2, a.latency_seconds))
        latencies.sort()
        p50s.append(latencies[len(latencies) // 2])
        p99s.append(latencies[int(len(latencies) * 0.99)])
        steady_cpus.append(steady)
        print(f"  latency run {run + 1}: p50 {p50s[-1] * 1000:,.0f} ms, "
              f"p99 {p99s[-1] * 1000:,.0f} ms, main thread "
              f"{steady['main_thread_seconds_per_event'] * 1e6:.1f} us/event", flush=True)
    p50, p99 = statistics.median(p50s), statistics.median(p99s)
    steady_cpu = {key: statistics.median(c[key] for c in steady_cpus) for key in steady_cpus[0]}
    stored, heap = _state_bytes()
    matched_stored, matched_heap = _state_bytes(labelled=True)
    stage_runs = [_stages(records, names) for _ in range(a.repeat)]
    join_cost = statistics.median(j for j, _ in stage_runs)
    model_cost = statistics.median(m for _, m in stage_runs)
    # One partition: the worker then sees the labels in publication order, the order the
    # standalone detector is fed, so any difference is the service's own.
    drift_settings = replace(settings, topic_prefix=settings.topic_prefix + "drift.",
                             partitions=1)
    asyncio.run(ensure_topics(drift_settings))
    service, standalone = asyncio.run(_detection(drift_settings, a.change_at, rate / 2))

    rows = [
        ("raw aiokafka ceiling (getmany + orjson)", f"{ceiling:,.0f} events/s"),
        ("Faust floor: agent that does nothing", f"{floor:,.0f} events/s"),
        ("worker, everything on", f"{rate:,.0f} events/s"),
        ("model stage done, after the join's last input", f"{statistics.median(trails):.2f} s"),
        ("Faust floor / ceiling", f"{floor / ceiling:.1%}"),
        ("worker / ceiling", f"{statistics.median(ratios):.1%}"),
        ("worker / Faust floor", f"{rate / floor:.1%}"),
        ("worker main thread busy (CPU / wall clock)", f"{cpu['main_thread_busy']:.0%}"),
        ("worker main thread CPU per event",
         f"{cpu['main_thread_seconds_per_event'] * 1e6:.1f} us"),
        ("worker CPU, all threads", f"{cpu['process_cores']:.2f} cores"),
        ("machine busy meanwhile (all processes)",
         f"{cpu['machine_busy_cores']:.2f} of {cpu['machine_cores']:.0f} cores"),
        ("two processes, join + model stage (DRIFTWARDEN_ROLE)", f"{split:,.0f} events/s"),
        ("two processes / ceiling", f"{statistics.median(split_ratios):.1%}"),
        ("two processes: join main thread busy",
         f"{split_cpu['join']['main_thread_busy']:.0%}"),
        ("two processes: model stage main thread busy",
         f"{split_cpu['monitor']['main_thread_busy']:.0%}"),
        ("two processes: CPU, all threads",
         f"{split_cpu['join']['process_cores'] + split_cpu['monitor']['process_cores']:.2f}"
         " cores"),
        ("two processes: peak RSS, join + model stage",
         f"{split_peak['join'] / 2**20:,.0f} + {split_peak['monitor'] / 2**20:,.0f} MiB"),
        ("machine busy during the two-process runs",
         f"{split_cpu['join']['machine_busy_cores']:.2f} of "
         f"{split_cpu['join']['machine_cores']:.0f} cores"),
        ("models/ in-process per event: join", f"{join_cost * 1e6:.1f} us"),
        ("models/ in-process per event: model stage", f"{model_cost * 1e6:.1f} us"),
        ("models/ in-process alone (no Faust, no Kafka)",
         f"{1 / (join_cost + model_cost):,.0f} events/s"),
        (f"label -> absorbed at {rate / 2:,.0f} ev/s, p50", f"{p50 * 1000:,.0f} ms"),
        (f"label -> absorbed at {rate / 2:,.0f} ev/s, p99", f"{p99 * 1000:,.0f} ms"),
        (f"worker at {rate / 2:,.0f} ev/s: main thread busy",
         f"{steady_cpu['main_thread_busy']:.0%}"),
        (f"worker at {rate / 2:,.0f} ev/s: main thread CPU per event",
         f"{steady_cpu['main_thread_seconds_per_event'] * 1e6:.1f} us"),
        ("machine busy before the bench", f"{idle:.2f} cores"),
        ("worker peak RSS", f"{statistics.median(rss) / 2**20:,.0f} MiB"),
        ("join state per pending prediction, stored", f"{stored:,.0f} bytes"),
        ("join state per pending prediction, Python heap", f"{heap:,.0f} bytes"),
        ("join state per matched id (kept a label TTL), stored", f"{matched_stored:,.0f} bytes"),
        ("join state per matched id, Python heap", f"{matched_heap:,.0f} bytes"),
        ("detection delay, service (outcomes)", f"{service}"),
        ("detection delay, standalone river ADWIN", f"{standalone}"),
    ]
    print(f"driftwarden bench, median of {a.repeat} runs (ceiling, worker and latency)")
    print_table(rows, 16)
    if a.json:
        print(orjson.dumps({
            "events": total, "partitions": partitions, "repeat": a.repeat,
            "events_per_second": rate, "ceiling_events_per_second": ceiling,
            "ratio_to_ceiling": statistics.median(ratios),
            "faust_floor_events_per_second": floor,
            "models_seconds_per_event": {"join": join_cost, "model_stage": model_cost},
            "p50_latency_seconds": p50, "p99_latency_seconds": p99,
            "latency_rate_events_per_second": rate / 2, "latency_worker_cpu": steady_cpu,
            "idle_machine_busy_cores": idle,
            "peak_rss_bytes": statistics.median(rss),
            "model_stage_trail_seconds": statistics.median(trails),
            "worker_cpu": cpu,
            "split_events_per_second": split,
            "split_ratio_to_ceiling": statistics.median(split_ratios),
            "split_cpu": split_cpu, "split_peak_rss_bytes": split_peak,
            "state_bytes_per_pending": stored, "heap_bytes_per_pending": heap,
            "state_bytes_per_matched": matched_stored, "heap_bytes_per_matched": matched_heap,
            "detection_delay_outcomes": {"service": service, "standalone": standalone},
            "runs": {"ceiling": ceilings, "faust_floor": floors, "worker": rates,
                     "p50_latency_seconds": p50s, "p99_latency_seconds": p99s,
                     "latency_worker_cpu": steady_cpus,
                     "peak_rss_bytes": rss, "model_stage_trail_seconds": trails,
                     "worker_cpu": cpus, "split": splits, "split_cpu": split_cpus,
                     "split_peak_rss_bytes": split_rss,
                     "models_seconds_per_event": stage_runs},
        }).decode())
    return 0
