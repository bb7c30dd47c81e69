"""The two stateful agents: ``join`` (keyed by prediction id) and ``monitor`` (by model).

A worker runs both, or one of them (``DRIFTWARDEN_ROLE``): they meet only through the
records topic, so each can have a process, a core and an interpreter lock of its own.

Each takes a batch of events (the join a whole fetch, handed over by the consumer's batch
route, :class:`streams.app.BatchConsumer`; the monitor a Faust stream's ``take_events``
batch), calls ``models/``, then writes, awaiting the acks of each step before the next:

- join, per partition (``models.join`` explains why this order): the ``p`` records and
  the dead letters of unparseable events; the write-ahead entry; the ``o`` records and
  the other dead letters; the changed entries, meta entry last;
- monitor: retraining events, then each changed model's state (one message per model);
- then the metrics snapshot.

Events are acknowledged only after their batch's writes are acked, and Faust commits a
consumer offset only after flushing the producer, so a committed offset implies written
state; state written without a committed offset is re-read after a crash
and skipped by the offsets recorded in the state (DESIGN.md section 5). Both agents run
with ``concurrency=1`` (faust-streaming issue 606).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP, Message

from models import codec
from models.errors import ConfigError, StateError
from models.join import (
    DeadLetter,
    Flush,
    InputRecord,
    JoinPartition,
    ModelRecord,
    decode_records,
    encode_records,
    expiry_heaps,
    wal_key,
)
from models.monitor import ModelState
from models.performance import recoverable
from models.policy import SHAPING_KEYS, PolicyBook
from models.reference import ReferenceProfile
from streams.app import App, BatchConsumer
from streams.metrics import (
    EVENTS_CONSUMED,
    EVENTS_RECEIVED,
    REPLAYS_SKIPPED,
    Snapshot,
)
from streams.settings import Settings
from streams.tables import Tables, entries, every_entry, shared_entries, track_topics, write
from streams.topics import TopicNames

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)
# The partition the join's producer sends a model's records to (Kafka's murmur2 default).
_PARTITIONER = DefaultPartitioner()
# A join partition is drained early once it holds this many bytes of input, so that its
# write-ahead entry stays well inside the changelog's message size limit.
_FLUSH_BYTES = 1 << 20
# Most bytes of a dead letter's value and key: with the headers, within Kafka's default
# message.max.bytes (1,048,588), which the dead-letters topic may well have.
DEAD_LETTER_MAX_BYTES = 1_000_000
DEAD_LETTER_MAX_KEY_BYTES = 16_384


def _groups(messages: Sequence[Message]) -> list[tuple[TP, list[InputRecord]]]:
    """Faust messages as the batch route hands records over: runs by partition."""
    out: list[tuple[TP, list[InputRecord]]] = []
    for msg in messages:
        if not out or out[-1][0] != msg.tp:
            out.append((msg.tp, []))
        out[-1][1].append(InputRecord(msg.offset, round(msg.timestamp * 1000), msg.key,
                                      msg.value))
    return out


def _none_missing(records: Sequence[Any], expected: int | None) -> bool:
    """Do ``records`` (in offset order) follow on from offset ``expected`` (None: no
    offset absorbed yet) without a missing offset?

    >>> from models.join import InputRecord
    >>> def fetch(*offsets):
    ...     return [InputRecord(o, 0, None, b"") for o in offsets]
    >>> _none_missing(fetch(5, 6), 5), _none_missing(fetch(3, 4, 5), 5)  # replays too
    (True, True)
    >>> _none_missing(fetch(6, 7), 5), _none_missing(fetch(5, 7), 5)
    (False, False)
    >>> _none_missing(fetch(0, 1), None), _none_missing(fetch(0, 2), None)
    (True, False)
    """
    first = records[0].offset
    return (records[-1].offset - first == len(records) - 1
            and (expected is None or first <= expected))


def _records_key(partition: int) -> str:
    """Models-table key of a records partition's marker: the next offset the model stage
    has to absorb there. No model's key (:func:`_model_key`) is one."""
    return f"\x00records:{partition}"


def _model_key(model: str) -> str:
    r"""Models-table key of a model's state: its name, with one more NUL in front when the
    name starts with one, so that a key starting with a single NUL is always a marker.

    >>> _model_key("fraud"), _model_key("\x00records:1")
    ('fraud', '\x00\x00records:1')
    """
    return "\x00" + model if model.startswith("\x00") else model


def _model_of(key: str) -> str | None:
    r"""The model whose state a models-table key holds; None for a marker.

    >>> _model_of("fraud"), _model_of(_model_key("\x00x")), _model_of(_records_key(3))
    ('fraud', '\x00x', None)
    """
    if not key.startswith("\x00"):
        return key
    return key[1:] if key.startswith("\x00\x00") else None


def _required(table: faust.Table | None, name: str) -> faust.Table:
    if table is None:  # a wiring bug: register() only wires the role's own stages
        raise RuntimeError(f"the {name} table is not this worker's (DRIFTWARDEN_ROLE)")
    return table


class Pipeline:
    """Agents, their in-memory caches and the metrics snapshot of one worker."""

    def __init__(self, app: App, settings: Settings, tables: Tables,
                 snapshot: Snapshot) -> None:
        self.app = app
        self.settings = settings
        self.names = TopicNames.from_settings(settings)
        self.tables = tables
        self.snapshot = snapshot
        self.policies: PolicyBook = settings.policies()
        self.logical = {self.names.predictions: "predictions", self.names.labels: "labels"}
        # Caches over the tables; dropped on every rebalance and rebuilt from the tables.
        self.joins: dict[int, JoinPartition] = {}
        # Expiry heaps of the assigned join partitions not opened yet, read in one pass
        # over the table when the first one opens after a rebalance (models.join.expiry_heaps).
        self._heaps: dict[int, dict[str, list[tuple[float, str]]]] = {}
        self.states: dict[str, tuple[int, ModelState]] = {}
        # Per model: the records offset from which the policy file's changed policy
        # applies, as found when this assignment loaded its state (_loaded).
        self._policy_at: dict[str, int] = {}
        # Published reference profiles: model -> {version: (fingerprint, profile)}. Every
        # worker reads the whole compacted topic, whichever models it owns.
        self.references: dict[str, dict[str, tuple[str, ReferenceProfile]]] = {}
        # Next offset to process per input partition, for the consumer-lag gauge.
        self.next_offset: dict[Any, int] = {}
        self._stale_snapshot = False
        # True from the end of a rebalance's table recovery to the start of the next one.
        # (Faust's recovery.completed stays set once the first recovery ends, so it cannot
        # tell whether the tables being read now are complete.)
        self._recovered = False
        # True between a revocation and the assignment that follows it.
        self._rebalancing = False
        # The join agent and the timer that opens recovered partitions take turns.
        self._join_lock = asyncio.Lock()
        # Reads records Faust skipped (see _missed); one reader at a time.
        self._probe: AIOKafkaConsumer | None = None
        self._probe_lock = asyncio.Lock()
        # The model stage: per records partition, the next offset it has to absorb (loaded
        # from the models table's marker, _records_key); dropped on every rebalance.
        self._records_next: dict[int, int | None] = {}
        # The model stage's batches and the timer that fills what they missed take turns.
        self._monitor_lock = asyncio.Lock()
        self.logical[self.names.model_records] = "model-records"
        snapshot.runs_join = tables.join is not None
        snapshot.runs_models = tables.models is not None
        # Export zeros before the first event, for the topics this worker's role reads.
        read = (["predictions", "labels"] if tables.join is not None else []) + (
            ["model-records"] if tables.models is not None else [])
        for topic in read:
            EVENTS_CONSUMED.labels(topic)
            if topic != "model-records":
                EVENTS_RECEIVED.labels(topic)
            REPLAYS_SKIPPED.labels(topic)

    # -- wiring -------------------------------------------------------------------------

    @property
    def join_table(self) -> faust.Table:
        return _required(self.tables.join, "join")

    @property
    def models_table(self) -> faust.Table:
        return _required(self.tables.models, "models")

    def register(self) -> None:
        """Wire the stages of ``settings.role``: the join (reading ``predictions`` and
        ``labels``, writing the records topic), the model stage (reading the records
        topic and ``references``, writing ``retraining``), or both in one process."""
        if self.tables.join is not None:
            self._register_join()
        if self.tables.models is not None:
            self._register_monitor()

        @self.app.timer(5.0)
        async def lag() -> None:
            self.track_producer_topics()
            await self.check_broker()
            await self.measure_lag()
            await self.open_assigned()
            await self.fill_records()
            self.rebuild_snapshot()

        # mode's signal stubs want a ``signal`` keyword our receivers take via **kwargs.
        self.app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        self.app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]
        self.app.on_rebalance_complete.connect(self._on_recovered)  # type: ignore[arg-type]

    def _register_join(self) -> None:
        app, names = self.app, self.names
        inputs = app.topic(names.predictions, names.labels)

        # The agent subscribes the inputs (and so co-partitions the join table with
        # them); their records reach join_batch a fetch at a time through the app's
        # batch route (streams.app.BatchConsumer), not through this stream.
        @app.agent(inputs, concurrency=1, name="join")
        async def join(stream: faust.StreamT) -> None:
            async for events in self._batches(stream):  # should any come this way
                await self.join_batch(_groups([event.message for event in events]))

        # Predictions first: a label read in the same fetch then finds its prediction
        # rather than waiting for it as an entry of its own.
        app.route_batches((names.predictions, names.labels), self.join_batch)

    def _register_monitor(self) -> None:
        app, names = self.app, self.names
        records = app.topic(names.model_records)

        @app.agent(records, concurrency=1, name="monitor")
        async def monitor(stream: faust.StreamT) -> None:
            async for events in self._batches(stream):
                await self.monitor_batch(events)

        @app.task
        async def references() -> None:
            await self.follow_references()

    def producer_topics(self) -> list[str]:
        """The topics this worker's producer writes to."""
        n, tables = self.names, (self.tables.join, self.tables.models)
        own = {t.changelog_topic.get_topic_name() for t in tables if t is not None}
        if self.tables.join is not None:
            own |= {n.model_records, n.dead_letters}
        if self.tables.models is not None:
            own |= {n.retraining, n.dead_letters}  # invalid reference profiles
        return sorted(own)

    def track_producer_topics(self) -> asyncio.Future[Any] | None:
        """Have the producer keep metadata of :meth:`producer_topics` (and whatever
        aiokafka added), not of the whole cluster: :func:`streams.tables.track_topics`.
        Checked before each batch writes anything, so that every topic this worker
        writes is tracked before its first write. Returns the metadata update's future
        when the tracked topics grew, else None."""
        # Faust keeps no public view of the aiokafka producer under its own.
        return track_topics(getattr(self.app.producer, "_producer", None),
                            self.producer_topics())

    async def _producer_ready(self) -> None:
        update = self.track_producer_topics()
        if update is not None:
            await update

    def _is_regression(self, model: str) -> bool:
        return self.policies.for_model(model).task == "regression"

    def _batches(self, stream: faust.StreamT) -> AsyncIterator[Sequence[faust.EventT]]:
        s = self.settings
        return cast(faust.Stream, stream).take_events(s.batch_size, within=s.batch_seconds)

    async def _on_revoked(self, sender: Any, *args: Any, **kwargs: Any) -> None:
        # Tables are recovered from their changelogs after a rebalance; the caches over
        # them are rebuilt lazily, and series of what moved away stop being exported.
        self._recovered = False
        self._rebalancing = True
        self.joins.clear()
        self._heaps = {}
        self.states.clear()
        self._policy_at.clear()
        self._records_next.clear()
        self.next_offset.clear()
        self.snapshot.forget(set(self.snapshot.join), set(self.snapshot.models))

    async def _on_assigned(self, sender: Any, *args: Any, **kwargs: Any) -> None:
        self._recovered = self._rebalancing = False
        self.joins.clear()
        self._heaps = {}
        self.states.clear()
        self._policy_at.clear()
        self._records_next.clear()
        self._stale_snapshot = True

    async def _on_recovered(self, sender: Any, *args: Any, **kwargs: Any) -> None:
        """The tables are complete for the current assignment, unless this signal ends a
        recovery that a newer rebalance overtook.

        Faust sends ``on_rebalance_complete`` when a recovery ends, before it checks
        whether the consumer's generation moved on meanwhile; it then starts the newer
        generation's recovery. Believing the stale signal would open join partitions and
        rebuild the exported snapshot from tables still being recovered: a model whose
        records partition had just moved here would be missing from them and, with no
        new records, stay unexported. (Two CI failures under repeated kill -9 showed one
        model exported by no worker; the second came with no overtaken recovery, and its
        cause was the partition count :meth:`rebuild_snapshot` hashed over, see
        :meth:`streams.app.BatchConsumer.partition_count`.)
        """
        recovery = cast(Any, self.app.tables).recovery  # TableManager, not its interface
        generation = getattr(recovery, "_generation_id", None)  # no public view in Faust
        if (self._rebalancing or recovery.signal_recovery_start.is_set()
                or generation != self.app.consumer_generation_id):
            log.info("end of an overtaken table recovery (generation %s, consumer at %s): "
                     "waiting for the current one", generation, self.app.consumer_generation_id)
            return
        self._recovered = True
        self._stale_snapshot = True

    def rebuild_snapshot(self) -> None:
        """After a rebalance, export what the recovered tables hold, not only what the
        next events touch: a quiet model keeps its series on its new owner."""
        if not self._stale_snapshot or not self._recovered:
            return
        self._stale_snapshot = False
        assignment = self.app.consumer.assignment()
        for tp in assignment:
            if tp.topic == self.names.predictions:
                counts, pending = JoinPartition.peek(entries(self.join_table, tp.partition),
                                                     tp.partition)
                self.snapshot.set_join(tp.partition, counts, pending)
        # The in-memory table still holds models of partitions that moved away: export a
        # model only when its records' partition (the producer's key hash) is ours.
        owned = sorted(tp.partition for tp in assignment if tp.topic == self.names.model_records)
        if not owned:
            return
        count = cast(BatchConsumer, self.app.consumer).partition_count(self.names.model_records)
        if count is None:  # not known yet: the next tick tries again
            self._stale_snapshot = True
            return
        every = list(range(count))
        for key, raw in every_entry(self.models_table, owned):
            model = _model_of(key)
            if (model is not None and model not in self.snapshot.models
                    and _PARTITIONER(model.encode(), every, every) in owned):
                self.snapshot.set_model(codec.loads(raw))

    # -- join ---------------------------------------------------------------------------

    async def join_batch(self, batch: Sequence[tuple[TP, Sequence[Any]]]) -> None:
        """Join a fetch: ``(input partition, its aiokafka records)``, predictions first."""
        async with self._join_lock:
            # Counted as the batch begins; events_consumed once its writes are acknowledged.
            received: Counter[str] = Counter()
            for tp, records in batch:
                received[self.logical[tp.topic]] += len(records)
            for topic, n in received.items():
                EVENTS_RECEIVED.labels(topic).inc(n)
            await self._producer_ready()
            touched: dict[int, JoinPartition] = {}
            # Counted per batch: a labelled metric costs a lookup and a lock per call.
            consumed: Counter[str] = Counter()
            skipped: Counter[str] = Counter()
            for tp, records in batch:
                part = self.joins.get(tp.partition) or await self._open(tp.partition)
                topic = self.logical[tp.topic]
                touched[tp.partition] = part
                before = part.skipped
                if _none_missing(records, part.expected(topic)):  # the usual case
                    await self._absorb(part, topic, records)
                else:
                    for rec in records:
                        expected = part.expected(topic)
                        if expected is not None and rec.offset > expected:
                            missed = await self._missed(expected, tp, rec.offset)
                            EVENTS_RECEIVED.labels(topic).inc(len(missed))
                            await self._absorb(part, topic, missed)
                            consumed[topic] += len(missed)
                        await self._absorb(part, topic, [rec])
                skipped[topic] += part.skipped - before
                consumed[topic] += len(records)
                self.next_offset[tp] = records[-1].offset + 1
            for part in touched.values():
                part.expire(budget=_FLUSH_BYTES)
            await self._flush(list(touched.values()))
            for topic, n in consumed.items():
                EVENTS_CONSUMED.labels(topic).inc(n)
            for topic, n in skipped.items():
                if n:
                    REPLAYS_SKIPPED.labels(topic).inc(n)

    async def _absorb(self, part: JoinPartition, topic: str, records: Sequence[Any]) -> None:
        """Absorb records in offset order, draining the partition early whenever it holds
        _FLUSH_BYTES of input."""
        taken = 0
        while taken < len(records):
            taken += part.absorb_many(topic, records[taken:] if taken else records,
                                      budget=_FLUSH_BYTES)
            if part.held >= _FLUSH_BYTES:
                await self._flush([part])

    async def _missed(self, expected: int, tp: TP, offset: int) -> list[Any]:
        """The records of ``tp`` from offset ``expected`` up to ``offset``.

        faust-streaming drops events it has fetched but not handed to the agent when a
        rebalance suspends the flow, and may commit past them as a gap (seen as 23
        predictions lost under repeated kill -9). So a gap in an input partition's
        offsets is filled from the broker directly; one the broker cannot fill
        (transaction markers, deleted by retention) is accepted.
        """
        async with self._probe_lock:  # the join and the model stage share the reader
            missed = await self._read_range(expected, tp, offset)
        if missed:
            log.warning("%d records of %s[%d] before offset %d never reached the agent; "
                        "read them from the broker", len(missed), tp.topic, tp.partition,
                        offset)
        return missed

    async def _probe_consumer(self) -> AIOKafkaConsumer:
        """The consumer that reads what the group's consumer did not hand over."""
        if self._probe is None:
            self._probe = AIOKafkaConsumer(
                bootstrap_servers=self.settings.bootstrap_servers, enable_auto_commit=False,
                group_id=None, **self.settings.aiokafka_security())
            await self._probe.start()
        return self._probe

    async def _end_offset(self, at: TP) -> int:
        tp = TopicPartition(at.topic, at.partition)
        async with self._probe_lock:
            probe = await self._probe_consumer()
            return int((await probe.end_offsets([tp]))[tp])

    async def _read_range(self, expected: int, at: TP, offset: int) -> list[Any]:
        tp = TopicPartition(at.topic, at.partition)  # aiokafka's, not Faust's TP
        probe = await self._probe_consumer()
        probe.assign([tp])
        probe.seek(tp, expected)
        missed: list[Any] = []
        while True:
            batch = (await probe.getmany(tp, timeout_ms=5000)).get(tp, [])
            missed += [r for r in batch if r.offset < offset]
            if not batch or batch[-1].offset >= offset - 1:
                break
        return missed

    async def _open(self, partition: int) -> JoinPartition:
        """The partition's join state; first finishes a batch a dead worker left half-sent."""
        store = entries(self.join_table, partition)
        if not self.joins and not self._heaps and shared_entries(self.join_table) is not None:
            # The first since the rebalance, over the one store of all partitions.
            assigned = {tp.partition for tp in self.app.consumer.assignment()
                        if tp.topic == self.names.predictions} | {partition}
            # Every assigned partition gets heaps, empty ones too.
            self._heaps = {p: {} for p in assigned} | expiry_heaps(store, assigned)
        # None (not assigned when the table was read): the partition reads it itself.
        heaps = self._heaps.pop(partition, None)
        part = self.joins[partition] = JoinPartition(
            store, partition, self.settings.label_ttl_seconds, regression=self._is_regression,
            max_versions=self.settings.max_model_versions, heaps=heaps,
            duplicate_window=self.settings.duplicate_window)
        flush = part.recovered
        if flush is not None:
            log.warning("join partition %d: re-sending %d records of a batch a crash "
                        "interrupted", partition, len(flush.records))
            await self._send(*flush.outbox())
            await self._write_all([(partition, flush.writes)])
            part.recovered = None
        return part

    async def open_assigned(self) -> None:
        """Open every assigned join partition once its table is recovered, so that a batch
        a crash interrupted is completed even when no new event arrives on its partition."""
        if not self._recovered:
            return
        async with self._join_lock:
            await self._producer_ready()
            for tp in self.app.consumer.assignment():
                if not self._recovered:  # a rebalance began while a batch was re-sent
                    return
                if tp.topic == self.names.predictions and tp.partition not in self.joins:
                    await self._open(tp.partition)

    async def _flush(self, parts: list[JoinPartition]) -> None:
        flushes: list[tuple[JoinPartition, Flush]] = []
        for part in parts:
            flush = part.drain()
            if flush.wal is not None:
                flushes.append((part, flush))
        if not flushes:
            return
        await self._send_all([flush.early() for _, flush in flushes])
        await self._write_all([(part.partition, {wal_key(part.partition): flush.wal})
                               for part, flush in flushes])
        await self._send_all([flush.outbox() for _, flush in flushes])
        await self._write_all([(part.partition, flush.writes) for part, flush in flushes])
        for part, _ in flushes:
            self.snapshot.set_join(part.partition, part.counts, part.pending())

    async def _send_all(self, parts: list[tuple[list[ModelRecord], list[DeadLetter]]]) -> None:
        await self._send([r for rs, _ in parts for r in rs], [d for _, ds in parts for d in ds])

    async def _write_all(self, changes: list[tuple[int, dict[str, bytes | None]]]) -> None:
        """Changelog writes of the join table, per partition; return once all are acked."""
        acks = []
        for partition, writes in changes:
            acks += await write(self.join_table, partition, writes)
        await asyncio.gather(*acks)

    async def _send(self, records: list[ModelRecord], dead: list[DeadLetter]) -> None:
        """Send records (a model's in one message or, past RECORDS_MESSAGE_BYTES, several)
        and dead letters; return once all are acked."""
        sends = [await self._dead_letter(d) for d in dead]
        for model, raw in encode_records(records, runs=self.settings.records_format == "runs"):
            sends.append(await self.app.producer.send(
                self.names.model_records, model.encode(), raw, None, None, None))
        await asyncio.gather(*sends)

    async def _dead_letter(self, d: DeadLetter) -> Any:
        origin = {"predictions": self.names.predictions, "labels": self.names.labels,
                  "references": self.names.references,
                  "model-records": self.names.model_records}[d.topic]
        headers = [
            ("dw.origin.topic", origin.encode()),
            ("dw.origin.partition", str(d.partition).encode()),
            ("dw.origin.offset", str(d.offset).encode()),
            ("dw.reason", d.reason.encode()),
        ]
        raw, key = d.raw, d.key
        # A letter Kafka refuses would stop the worker at this event on every restart:
        # past Kafka's default 1 MiB message size it keeps the start, and says so.
        if raw is not None and len(raw) > DEAD_LETTER_MAX_BYTES:
            headers.append(("dw.truncated", str(len(raw)).encode()))
            raw = raw[:DEAD_LETTER_MAX_BYTES]
        if key is not None and len(key) > DEAD_LETTER_MAX_KEY_BYTES:
            headers.append(("dw.truncated.key", str(len(key)).encode()))
            key = key[:DEAD_LETTER_MAX_KEY_BYTES]
        return await self.app.producer.send(
            self.names.dead_letters, key, raw, None, None, headers)

    async def check_broker(self) -> None:
        """``driftwarden_broker_up``: can a bootstrap server be reached; logged per outage."""
        up = False
        for host, port in self.settings.servers:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
            except (OSError, TimeoutError):
                continue
            writer.close()
            up = True
            break
        if up != self.snapshot.broker_up:
            if up:
                log.warning("Kafka is reachable again at %s", self.settings.bootstrap_servers)
            else:
                log.warning("Kafka unreachable at %s; clients retry with backoff",
                            self.settings.bootstrap_servers)
        self.snapshot.broker_up = up

    async def measure_lag(self) -> None:
        consumer = self.app.consumer
        tps = [tp for tp in consumer.assignment() if tp.topic in self.logical]
        if not tps:
            return
        # Only calls that read the consumer's state: position() can wait on an offset reset
        # that needs the very fetch loop it queues behind, and stall the worker.
        highwaters = await consumer.highwaters(*tps)
        committed = getattr(consumer, "_committed_offset", {})  # Faust keeps no public view
        lag = {}
        for tp in tps:
            high = highwaters.get(tp)
            if high is None:
                continue
            position = self.next_offset.get(tp, committed.get(tp) or 0)
            lag[self.logical[tp.topic], tp.partition] = max(0, high - position)
        self.snapshot.lag = lag

    # -- references ---------------------------------------------------------------------

    async def follow_references(self) -> None:
        """Read the compacted ``references`` topic from the start, then follow it.

        An unreadable profile is dead-lettered once this process has read to the end the
        topic had when it started, and only if no later record of its key (a profile or a
        tombstone) replaced it meanwhile; after that, as it is read.
        """
        # No group: aiokafka then assigns every partition, read from the earliest offset.
        consumer = AIOKafkaConsumer(
            self.names.references, bootstrap_servers=self.settings.bootstrap_servers,
            enable_auto_commit=False, auto_offset_reset="earliest", group_id=None,
            **self.settings.aiokafka_security())
        await consumer.start()
        try:
            ends: dict[TopicPartition, int] | None = None  # the ends when first assigned
            held: dict[bytes | None, Any] | None = {}  # catching up: unreadable, by key
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    for rec in records:
                        await self._reference(rec, held)
                if held is None:
                    continue
                if ends is None and consumer.assignment():
                    ends = await consumer.end_offsets(list(consumer.assignment()))
                if ends is not None and all(
                        [await consumer.position(tp) >= end for tp, end in ends.items()]):
                    log.info("references: read to the end (%d unreadable)", len(held))
                    for rec in held.values():
                        await self._reference_dead_letter(rec)
                    held = None
        finally:
            await consumer.stop()

    async def _reference(self, rec: Any, held: dict[bytes | None, Any] | None) -> None:
        """Take in one record of ``references``. ``held``: while catching up, the
        unreadable profiles not yet dead-lettered, by key; ``None`` after."""
        # This record replaces whatever its key held, readable or not.
        self.snapshot.invalid_references.discard(rec.key)
        if held is not None:
            held.pop(rec.key, None)
        if rec.value is None:  # a tombstone withdraws the profile of its model:version key
            key = (rec.key or b"").decode(errors="replace")
            # Matched whole, not split: a model or version may itself hold a ':'.
            for versions in self.references.values():
                for version, (_, profile) in list(versions.items()):
                    if profile.key == key:
                        del versions[version]
                        log.info("reference profile for %s withdrawn", key)
            return
        try:
            profile = ReferenceProfile.from_json(rec.value)
        except ConfigError as exc:
            log.warning("reference at %s[%d]@%d rejected: %s", rec.topic, rec.partition,
                        rec.offset, exc)
            self.snapshot.invalid_references.add(rec.key)
            if held is not None:
                held[rec.key] = rec
            else:
                await self._reference_dead_letter(rec)
            return
        self.references.setdefault(profile.model, {})[profile.version] = (
            profile.fingerprint(), profile)
        log.info("reference profile for %s (%d rows) received", profile.key, profile.n)

    async def _reference_dead_letter(self, rec: Any) -> None:
        await self._producer_ready()
        await (await self._dead_letter(DeadLetter(
            "references", rec.partition, rec.offset, "invalid_reference", rec.value,
            rec.key)))  # acknowledged, then counted
        self._count_dead("references", "invalid_reference")

    def _count_dead(self, topic: str, reason: str) -> None:
        dead = self.snapshot.stage_dead_letters
        dead[topic, reason] = dead.get((topic, reason), 0) + 1

    # -- monitor ------------------------------------------------------------------------

    async def monitor_batch(self, events: Sequence[faust.EventT]) -> None:
        """Absorb a batch of the records topic: each partition's messages in offset order,
        with any offsets missing before them read from the broker first (_records_from)."""
        runs: list[tuple[TP, list[Any]]] = []
        for event in events:
            msg = event.message
            if not runs or runs[-1][0] != msg.tp:
                runs.append((msg.tp, []))
            runs[-1][1].append(msg)
        async with self._monitor_lock:
            await self._monitor(runs)

    async def fill_records(self) -> None:
        """Absorb what the consumer group committed past on an assigned records partition
        without the model stage having absorbed it (see :meth:`_records_from`); for the
        last messages of a partition, which no later message would reveal missing."""
        if not self._recovered or self.tables.models is None:
            return
        committed = getattr(self.app.consumer, "_committed_offset", {})  # no public view
        async with self._monitor_lock:
            for tp in self.app.consumer.assignment():
                if tp.topic != self.names.model_records or not self._recovered:
                    continue
                expected, done = self._records_expected(tp.partition), committed.get(tp)
                if expected is not None and done is not None and done > expected:
                    missed = await self._missed(expected, tp, done)
                    if self._recovered:  # no rebalance began meanwhile
                        # What the broker no longer holds (retention) is accepted.
                        await self._monitor([(tp, missed)], ends={tp.partition: done})

    def _stored(self, model: str, partition: int) -> ModelState:
        """The model's state as the models table holds it (under its records partition),
        or a new one. One that cannot be read back (a later release's, or corrupted) stops
        the model stage, naming the model: starting it afresh would overwrite the stored
        state."""
        raw = entries(self.models_table, partition).get(_model_key(model))
        if raw is None:
            return ModelState(model, self.policies)
        try:
            return cast(ModelState, codec.loads(raw))
        except StateError as exc:
            raise StateError(f"the models table's state of model {model!r} cannot be read "
                             f"back ({exc}); was it written by a later release?") from exc

    async def _loaded(self, model: str, tp: TP, ends: dict[int, int],
                      first: dict[str, tuple[int, bytes]]) -> ModelState:
        """:meth:`_stored`, and the policy file's policy for the model if it changed, from
        the records partition's end offset on (read once per batch, into ``ends``, after
        the batch was fetched): whatever lies before it may have been absorbed before a
        crash with its retraining events sent but not its state stored, and is absorbed
        again under the policy it had (``ModelState.reconfigure``). For the same reason
        a model not stored yet has its state as first seen, under the policy it is first
        seen under, put in ``first``: stored before its first batch's events are sent."""
        if entries(self.models_table, tp.partition).get(_model_key(model)) is None:
            state = ModelState(model, self.policies)
            first[model] = (tp.partition, codec.dumps(state))
            return state
        state = self._stored(model, tp.partition)
        changed = state.latest_config().changed(self.policies.for_model(model))
        if changed:
            if tp.partition not in ends:
                ends[tp.partition] = await self._end_offset(tp)
            at = self._policy_at[model] = ends[tp.partition]
            state.reconfigure(self.policies, at)
            shaping = [name for name in changed if name in SHAPING_KEYS]
            log.info("model %r: policy changed since its state was stored (%s): applies to "
                     "the versions it monitors from %s[%d] offset %d on%s", model,
                     ", ".join(changed), tp.topic, tp.partition, at,
                     f", but for {', '.join(shaping)}, which apply to versions first seen "
                     "from then on" if shaping else "")
        return state

    def _referenced(self, state: ModelState) -> ModelState:
        """``state``, using its model's published reference profiles."""
        for fingerprint, profile in self.references.get(state.model, {}).values():
            state.use_reference(profile, fingerprint)
        return state

    def _unabsorb(self, model: str, partition: int,
                  absorbed: list[tuple[int, list[Any]]]) -> tuple[int, ModelState]:
        """The model's state after ``absorbed`` alone: its stored state (as of the last
        batch) with them absorbed again. Absorbing is deterministic, so this is the state
        as if the message that failed part-way through had never come; the retraining
        events they fire again were already taken the first time."""
        state = self._stored(model, partition)
        at = self._policy_at.get(model)
        if at is not None:  # the policy change this assignment found (_loaded)
            state.reconfigure(self.policies, at)
        state = self._referenced(state)
        for offset, records in absorbed:
            state.reach(offset)
            state.absorb_many(records)
        entry = self.states[model] = (partition, state)
        return entry

    def _unreadable(self, tp: TP, msg: Any, exc: BaseException) -> DeadLetter:
        """The dead letter of a records message the model stage could not absorb, logged
        with what went wrong but no value (StateError's messages name columns and
        sources, others may quote a value: their type and where they were raised)."""
        if isinstance(exc, StateError):
            why = str(exc)
        else:
            frames = traceback.extract_tb(exc.__traceback__)
            where = ("" if not frames else " at {}:{}".format(
                "/".join(frames[-1].filename.split("/")[-2:]), frames[-1].lineno))
            why = f"{type(exc).__name__}{where}"
        log.error("records message %s[%d]@%d dead-lettered as invalid_record: %s",
                  tp.topic, tp.partition, msg.offset, why)
        return DeadLetter("model-records", tp.partition, msg.offset, "invalid_record",
                          msg.value, msg.key)

    def _records_expected(self, partition: int) -> int | None:
        if partition not in self._records_next:
            raw = entries(self.models_table, partition).get(_records_key(partition))
            self._records_next[partition] = int(raw) if raw is not None else None
        return self._records_next[partition]

    async def _records_from(self, tp: TP, messages: list[Any], end: int | None = None,
                            ) -> list[Any]:
        """``messages`` of a records partition, after any the model stage has not absorbed
        below the first of them (read from the broker), or within them.

        A model's state skips any record at or below the position it absorbed from that
        record's source, so the model stage must absorb each records partition in offset
        order: a message it never sees, or sees only after later ones, is lost. Under
        repeated kill -9, faust-streaming committed past messages of the records topic
        that never reached the agent (a CI run lost 773 outcomes of one model: the model
        stage absorbed offsets up to 755, then from 766 on). So each records partition has
        a marker in the models table, the next offset to absorb, written after the states
        of each batch; a message past it first brings in what lies between. ``end``:
        the messages are all there is below this offset.
        """
        expected = self._records_expected(tp.partition)
        out: list[Any] = []
        for msg in messages:
            if expected is not None and msg.offset > expected:
                out += await self._missed(expected, tp, msg.offset)
            out.append(msg)
            if expected is None or msg.offset >= expected:
                expected = msg.offset + 1
        if end is not None and (expected is None or end > expected):
            expected = end
        self._records_next[tp.partition] = expected
        return out

    async def _monitor(self, runs: list[tuple[TP, list[Any]]],
                       ends: dict[int, int] | None = None) -> None:
        """Absorb runs of records messages (Faust messages or aiokafka records: ``key``,
        ``value``, ``offset``); then write retraining events, the changed states and each
        partition's marker, in that order, each step acked before the next. ``ends``: per
        partition, the offset below which its run is all there is."""
        await self._producer_ready()
        touched: dict[str, tuple[int, ModelState]] = {}
        retraining: list[dict[str, Any]] = []
        # Per records partition, its end offset as a changed policy file found it; per
        # model first seen, its state as first seen (_loaded).
        policy_ends: dict[int, int] = {}
        first: dict[str, tuple[int, bytes]] = {}
        # Per model, the records of this batch's messages absorbed so far (_unabsorb).
        absorbed: dict[str, list[tuple[int, list[Any]]]] = {}
        dead: list[DeadLetter] = []
        read = 0
        for tp, messages in runs:
            for msg in await self._records_from(tp, messages, (ends or {}).get(tp.partition)):
                read += 1
                # The join keys records by model and writes only what this stage reads; a
                # message that is not so (another writer's, a later release's) is
                # dead-lettered whole, and the model's state is as if it never came. Any
                # exception, not only StateError: it would otherwise stop the worker at
                # this message on every restart.
                try:
                    if not msg.key or msg.value is None:
                        raise StateError("records message without a key or a value")
                    model = msg.key.decode()
                    records = list(decode_records(model, msg.value))
                except Exception as exc:
                    dead.append(self._unreadable(tp, msg, exc))
                    continue
                entry = self.states.get(model)
                if entry is None:
                    entry = self.states[model] = (
                        tp.partition, await self._loaded(model, tp, policy_ends, first))
                    if model in self._policy_at:
                        # Stored with this batch, whose messages all lie before the change
                        # (fetched before the end offset was read), even if none of them
                        # is absorbed: so a crash later replays nothing past it under
                        # the policy before.
                        touched[model] = entry
                state = self._referenced(entry[1])
                skipped, rejected = state.replays_skipped, state.rejected
                state.reach(msg.offset)
                try:
                    retraining += state.absorb_many(records)
                except BaseException as exc:  # a detector's panic too: it would stop the
                    if not recoverable(exc):   # worker at this message on every restart
                        raise
                    dead.append(self._unreadable(tp, msg, exc))
                    entry = self._unabsorb(model, tp.partition, absorbed.get(model, []))
                    if model in touched:
                        touched[model] = entry
                    continue
                if state.replays_skipped != skipped:
                    REPLAYS_SKIPPED.labels("model-records").inc(state.replays_skipped - skipped)
                if state.rejected != rejected:
                    log.warning("model %r: %d outcomes skipped (%d in all): their version "
                                "monitors a regression, and their prediction or label is not "
                                "a number within ±1e153; the join's policy file says "
                                "otherwise", model, state.rejected - rejected, state.rejected)
                absorbed.setdefault(model, []).append((msg.offset, records))
                touched[model] = entry
            if messages:
                self.next_offset[tp] = max(self.next_offset.get(tp, 0), messages[-1].offset + 1)
        if retraining or dead:
            # A model first seen in this batch that fires: its state as first seen is
            # stored before the events (_loaded).
            firsts: dict[int, dict[str, bytes]] = {}
            for model in {ev["model"] for ev in retraining} & first.keys():
                partition, blob = first[model]
                firsts.setdefault(partition, {})[_model_key(model)] = blob
            acks = []
            for partition, changes in firsts.items():
                entries(self.models_table, partition).update(changes)  # as write() expects
                acks.extend(await write(self.models_table, partition, changes))
            await asyncio.gather(*acks)
            sends = [await self._dead_letter(d) for d in dead]
            for ev in retraining:
                log.info("retraining event %s (%s)", ev["id"], ev["severity"])
                sends.append(await self.app.producer.send(
                    self.names.retraining, ev["model"].encode(), orjson.dumps(ev),
                    None, None, None))
            await asyncio.gather(*sends)
            for d in dead:  # acknowledged, then counted
                self._count_dead("model-records", d.reason)
        acks = []
        for model, (partition, state) in touched.items():
            blob = codec.dumps(state)
            key = _model_key(model)
            entries(self.models_table, partition)[key] = blob
            acks.extend(await write(self.models_table, partition, {key: blob}))
        await asyncio.gather(*acks)
        # Each marker once the states before it are stored: it never runs ahead of them.
        acks = []
        for partition in {tp.partition for tp, _ in runs}:
            next_ = self._records_next.get(partition)
            key, value = _records_key(partition), str(next_).encode()
            store = entries(self.models_table, partition)
            if next_ is not None and store.get(key) != value:
                store[key] = value
                acks.extend(await write(self.models_table, partition, {key: value}))
        await asyncio.gather(*acks)
        for _, state in touched.values():
            self.snapshot.set_model(state)
        if read:  # counted once stored, as the join counts its input
            EVENTS_CONSUMED.labels("model-records").inc(read)
