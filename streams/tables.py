"""The worker's tables, declared in one place.

Both tables hold bytes that ``models/`` encodes: the join table compact orjson entries
(``models.join``), the models table one ``ModelState`` per model (``models.codec``).
Agents change a partition's entries (:func:`entries`) and then call :func:`write`,
which sends each changed key to the changelog partition of the input partition it came
from, once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Collection, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

import faust
import faust.stores.memory
import faust.tables
import faust.tables.recovery
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.types import TP, AppT

from streams.settings import Settings

__all__ = [
    "READ_BUDGET_SECONDS",
    "READ_LIMIT_SECONDS",
    "ChangelogReader",
    "TableManager",
    "Tables",
    "declare_tables",
    "entries",
    "every_entry",
    "shared_entries",
    "track_topics",
    "write",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tables:
    """The tables of this process's role (``None``: the other role's)."""

    join: faust.Table | None  # prediction id -> pending entry; one meta entry per partition
    models: faust.Table | None  # model -> ModelState; one marker per records partition


class _Table(faust.Table):
    """A Faust table whose changelog topic is named by the settings.

    Faust names it after the app id, which is also the consumer group; a role runs under
    a group of its own (``Settings.group``) but must read and write the same changelog
    as a worker running both stages. Under ``memory://`` its store is a
    :class:`_PreloadingStore`, under ``rocksdb://`` a :class:`streams.durable.DurableStore`.
    """

    changelog_name = ""
    settings: Settings | None = None

    def _changelog_topic_name(self) -> str:
        return self.changelog_name

    def _new_store_by_url(self, url: Any) -> Any:
        scheme = str(url).split(":", 1)[0]
        if self.settings is None or scheme not in ("memory", "rocksdb"):
            return super()._new_store_by_url(url)
        if scheme == "memory":
            store: type[ChangelogReader] = _PreloadingStore
        else:  # imported only when used: RocksDB's library is 8 MiB of RSS
            from streams.durable import DurableStore
            store = DurableStore
        return cast(Any, store)(
            url, self.app, self, table_name=self.name, key_type=self.key_type,
            key_serializer=self.key_serializer, value_serializer=self.value_serializer,
            value_type=self.value_type, loop=self.loop, options=self.options,
            settings=self.settings)


#: Longest a rebalance spends reading changelogs itself (Faust's rebalance timeout is 60 s);
#: Faust's recovery reads what is left, from where this stopped.
READ_BUDGET_SECONDS = 20.0
#: Longest a reading of one table lasts however it goes (a broker that does not answer):
#: Faust's recovery gives up for good on a step that outlasts its broker request timeout
#: (90 s or more), and reads both tables in one such step.
READ_LIMIT_SECONDS = 30.0


class _Overtaken(Exception):
    """A changelog reading stopped by a newer rebalance."""


class ChangelogReader:
    """A store that reads its active changelog partitions itself, a fetch at a time, as
    Faust's recovery starts (:class:`TableManager`), and tells the recovery where it got
    to (``persisted_offset``), so that the recovery finds nothing left to read.

    Faust's recovery hands each changelog record through its event machinery and checks
    every partition's progress per record: about 6,600 records/s on an idle 2-core
    machine (278,000 records in 42 s; this reads them in 0.8 s), during which the worker
    takes no input. A partition the store holds nothing of is read from its start; one
    it holds from the offset after the last it applied, as Faust would (under
    ``memory://`` the worker's own writes since, applied again to the same result, and
    any another worker made meanwhile). A reading that fails or outlasts
    :data:`READ_BUDGET_SECONDS` leaves the rest to Faust, from where it stopped.
    """

    app: AppT
    table: Any
    settings: Settings

    def _held_offset(self, tp: TopicPartition) -> int | None:
        """The last offset of ``tp`` the store applied; None: it holds nothing of it."""
        raise NotImplementedError

    def _restart(self, tps: set[TopicPartition]) -> None:
        """Forget what the store holds of ``tps``: they are read from their start."""
        raise NotImplementedError

    def _apply(self, tp: TopicPartition, records: list[Any]) -> None:
        """Apply changelog ``records`` of ``tp`` (in offset order) and their last offset."""
        raise NotImplementedError

    def _reached(self, tp: TopicPartition, offset: int) -> None:
        """``tp`` is applied up to ``offset`` (the records past its last are not keys)."""
        raise NotImplementedError

    async def read_ahead(self, actives: set[TopicPartition]) -> None:
        """Read ``actives`` (this worker's active changelog partitions) into the store."""
        if not actives:
            return
        try:
            async with asyncio.timeout(READ_LIMIT_SECONDS):
                await self._read(actives, time.monotonic() + READ_BUDGET_SECONDS)
        except TimeoutError:
            log.warning("%s: reading changelog partitions took over %g s; Faust's recovery "
                        "reads the rest", self.table.changelog_topic.get_topic_name(),
                        READ_LIMIT_SECONDS)

    async def _read(self, tps: set[TopicPartition], deadline: float) -> int:
        """Read ``tps`` up to their ends into the store; return how many records."""
        settings = self.settings
        started = time.monotonic()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
            group_id=None, max_partition_fetch_bytes=settings.fetch_bytes,
            # Where the log no longer reaches back to held + 1: from its start.
            auto_offset_reset="earliest", **settings.aiokafka_security())
        n = 0
        # Faust's driver sets the generation as a newer rebalance's assignment arrives,
        # before its callback runs this store's on_rebalance, while this runs in the
        # recovery task that rebalance cancels only once that callback is over: a fetch
        # applied meanwhile could bring back the offset of a partition just taken away,
        # its entries then dropped (on_recovery_completed). So each step checks it.
        generation = self.app.consumer_generation_id

        def current() -> None:
            if self.app.consumer_generation_id != generation:
                raise _Overtaken("a newer rebalance began")

        try:
            # Held nothing of: the changelog alone says what they hold, from its start.
            held = {tp: self._held_offset(tp) for tp in tps}
            new = {tp for tp, offset in held.items() if offset is None}
            assigned = len(new)
            self._restart(new)
            await consumer.start()
            consumer.assign(list(tps))
            ends = await consumer.end_offsets(list(tps))
            # So too a changelog that no longer reaches where the last reading ended
            # (deleted and made again).
            gone = {tp for tp in tps - new if ends[tp] <= cast(int, held[tp])}
            current()
            self._restart(gone)
            new |= gone
            after = {tp: -1 if tp in new else cast(int, held[tp]) for tp in tps}
            # One request for all: aiokafka's seek_to_beginning waits for its fetcher's
            # reset, about 0.44 s a partition (3.5 s for 8 empty ones).
            starts = await consumer.beginning_offsets(list(new)) if new else {}
            for tp in tps:
                consumer.seek(tp, starts[tp] if tp in new else after[tp] + 1)
            pending = {tp for tp in tps if ends[tp] > after[tp] + 1}
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{READ_BUDGET_SECONDS:g} s passed")
                fetched = await consumer.getmany(*pending, timeout_ms=1000)
                current()
                for tp, records in fetched.items():
                    if records:
                        self._apply(tp, records)
                        n += len(records)
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
            current()
            for tp in tps:
                self._reached(tp, ends[tp] - 1)
            log.info("%s: read %d changelog records of %d partitions (%d newly assigned) "
                     "in %.1f s as recovery starts",
                     self.table.changelog_topic.get_topic_name(), n, len(tps), assigned,
                     time.monotonic() - started)
        except Exception as exc:
            # What was applied stays, with how far it got: Faust's recovery reads on from
            # there (a new partition with nothing read: from its start).
            log.warning("%s: reading changelog partitions stopped after %d records (%s: "
                        "%s); Faust's recovery reads the rest",
                        self.table.changelog_topic.get_topic_name(), n,
                        type(exc).__name__, exc)
        finally:
            try:
                await consumer.stop()
            except Exception as exc:
                log.warning("stopping the changelog reader: %s: %s", type(exc).__name__, exc)
        return n


class _PreloadingStore(ChangelogReader, faust.stores.memory.Store):
    """Faust's in-memory store, read by :class:`ChangelogReader`. A partition newly
    assigned is read from its start, after what the store held of it from an earlier
    assignment is dropped."""

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        # Per held changelog partition: the last offset applied (at first, end - 1).
        self._read_to: dict[TopicPartition, int] = {}
        # The partitions of the latest assignment: all the store keeps (see
        # on_recovery_completed).
        self._held: set[int] = set()

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP],
                           newly_assigned: set[TP], generation_id: int = 0) -> None:
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        if generation_id != self.app.consumer_generation_id:
            return  # a newer rebalance is under way: Faust's recovery skips this one too
        topic = self.table.changelog_topic.get_topic_name()
        actives = {TopicPartition(tp.topic, tp.partition)
                   for tp in self.app.assignor.assigned_actives() if tp.topic == topic}
        self._held = {tp.partition for tp in actives}
        for tp in set(self._read_to) - actives:
            del self._read_to[tp]

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        """Drop the entries of partitions no longer held. Faust's store judges by the
        partitions of the recovery that completed, which may be the one before a
        rebalance whose new partitions :meth:`on_rebalance` is reading already."""
        self._drop_keys(set(self._key_partition.values()) - self._held)

    def persisted_offset(self, tp: TP) -> int | None:
        return self._read_to.get(TopicPartition(tp.topic, tp.partition))

    def _held_offset(self, tp: TopicPartition) -> int | None:
        return self._read_to.get(tp)

    def _restart(self, tps: set[TopicPartition]) -> None:
        self._drop_keys({tp.partition for tp in tps})
        for tp in tps:
            self._read_to.pop(tp, None)

    def _drop_keys(self, partitions: set[int]) -> None:
        where = self._key_partition
        for key in [k for k, p in where.items() if p in partitions]:
            self.data.pop(key, None)
            del where[key]

    def _apply(self, tp: TopicPartition, records: list[Any]) -> None:
        data, where, partition = self.data, self._key_partition, tp.partition
        for rec in records:
            if rec.key is None:
                continue
            key = rec.key.decode()
            if rec.value is None:  # a tombstone: Faust's store deletes it
                data.pop(key, None)
                where.pop(key, None)
            else:
                data[key] = rec.value
                where[key] = partition
        self._read_to[tp] = records[-1].offset

    def _reached(self, tp: TopicPartition, offset: int) -> None:
        self._read_to[tp] = offset


class _Recovery(faust.tables.recovery.Recovery):
    """Faust's recovery, which first has each :class:`ChangelogReader` store read its
    active partitions, and then reads on from where they got to."""

    async def _build_highwaters(self, consumer: Any, tps: set[TP],
                                destination: Any, title: str) -> None:
        if title == "active":  # before the highwaters: they must not be older than this
            generation = self.app.consumer_generation_id
            for table, actives in list(self.actives_for_table.items()):
                store = cast(Any, table).data
                if not isinstance(store, ChangelogReader):
                    continue
                self._current(generation)
                await store.read_ahead({TopicPartition(tp.topic, tp.partition)
                                        for tp in actives})
                self._current(generation)
                for tp in actives:  # None (a partition it restarted): from the start
                    cast(Any, self.active_offsets)[tp] = table.persisted_offset(tp)
        await super()._build_highwaters(consumer, tps, destination, title)

    def _current(self, generation: int) -> None:
        """Stop this recovery (Faust starts the next) once a newer rebalance has begun:
        its partitions are not this one's, and the next table must not read them."""
        if self.app.consumer_generation_id != generation:
            raise faust.tables.recovery.RebalanceAgain()


class TableManager(faust.tables.TableManager):
    """Faust's table manager, whose recovery (:class:`_Recovery`) has the stores read
    their changelogs themselves.

    Not in the store's ``on_rebalance``: Faust calls it inside aiokafka's assignment
    callback, and aiokafka sends no heartbeat until that callback returns. A reading
    longer than the session timeout less a heartbeat interval (10 s and 3.3 s by
    default) had the broker drop the worker from the group while it went on to process
    the partitions it was given: two empty changelogs read in 3.5 s each (see
    :meth:`ChangelogReader._read`), and another worker took the partitions over while
    this one still wrote to them; a CI run under repeated kill -9 lost 40 to 70
    outcomes of each model. In the recovery, the heartbeats go on.
    """

    @property
    def recovery(self) -> faust.tables.recovery.Recovery:
        if self._recovery is None:
            self._recovery = _Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


def declare_tables(app: faust.App, partitions: int, settings: Settings) -> Tables:
    """Declare the tables of ``settings.role``: the join's, the model stage's, or both."""
    def table(name: str, help_: str) -> faust.Table:
        table = _Table(
            app, name=name, beacon=app.tables.beacon, partitions=partitions, key_type=str,
            value_type=bytes, help=help_,
            # A join batch's write-ahead entry is one message: allow what the producer does.
            extra_topic_configs={"max.message.bytes": str(4 * 1024 * 1024)},
        )
        table.changelog_name = settings.changelog(name)
        table.settings = settings
        # Faust would JSON-encode both. Values are the bytes models/ encoded: recovery
        # must hand them back untouched.
        table.key_serializer = "utf8"
        table.value_serializer = "raw"
        table.changelog_topic = table._new_changelog_topic()
        return cast(faust.Table, app.tables.add(table))

    stages = settings.stages
    return Tables(
        join=table("join", "Predictions waiting for labels (and labels for predictions)")
        if "join" in stages else None,
        models=table("models", "Per-model monitoring state")
        if "monitor" in stages else None,
    )


async def write(table: faust.Table, partition: int,
                changes: Mapping[str, bytes | None]) -> list[Awaitable[Any]]:
    """Send changes already applied in ``table.data`` to the changelog; return the acks.

    Sent straight through aiokafka as record batches, one produce entry per 16 KiB or so,
    rather than through Faust's per-key changelog buffer (which produces one message at a
    time and throttles the stream when it fills) or one ``send`` per key (a future, a
    partitioner call and an accumulator append each: an eighth of a busy worker's time).
    Each returned future resolves once its batch is acknowledged.
    """
    topic = table.changelog_topic.get_topic_name()
    producer = _kafka_producer(table.app)
    acks: list[Awaitable[Any]] = []
    counts: list[int] = []
    batch = producer.create_batch()
    # The memory store's record of each key's partition: Faust's recovery fills it, and
    # drops the keys of partitions that moved away by it (_PreloadingStore too).
    where = getattr(table.data, "_key_partition", None)
    for key, value in changes.items():
        if where is not None:
            if value is None:
                where.pop(key, None)
            else:
                where[key] = partition
        raw_key = key.encode()
        if batch.append(timestamp=None, key=raw_key, value=value) is None:  # full
            counts.append(batch.record_count())
            acks.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            batch.append(timestamp=None, key=raw_key, value=value)  # a first one always fits
    if batch.record_count():
        counts.append(batch.record_count())
        acks.append(await producer.send_batch(batch, topic, partition=partition))
    commit = getattr(table.data, "commit_when_acked", None)  # rocksdb:// (streams.durable)
    if commit is not None and acks:
        return [commit(partition, list(changes.items()), acks, counts)]
    return acks


def track_topics(producer: AIOKafkaProducer | None,
                 topics: Collection[str]) -> asyncio.Future[Any] | None:
    """Have ``producer`` keep metadata of ``topics``, and of those it tracks already.

    aiokafka's producer bootstraps with the whole cluster's metadata and refreshes all of
    it (every ``metadata.max.age.ms``) while its list of topics is empty; once the list
    has a topic, it refreshes the listed ones only, and adds a topic to the list only when
    a send finds it missing from the metadata. So the first send to a topic made after
    the producer started (a changelog Faust creates at start-up) narrowed the metadata to
    that one topic, and a batch already accepted for another topic (the records) lost its
    partition's leader for good: the sender then asked for metadata thousands of times a
    second and the batch, and the worker waiting for it, did not move until Faust's
    20-minute request timeout (6 of 7 workers fed 100,000 predictions on a freshly reset
    broker). Called
    before a worker writes: from then on every topic it writes is listed, whatever else
    aiokafka adds, and the rest of the cluster is not fetched. Returns the metadata
    update's future when the list grew, else None (also before the producer started).
    """
    client = getattr(producer, "client", None)
    if client is None:
        return None
    tracked: set[str] = client._topics  # aiokafka keeps no public view of its list
    if tracked.issuperset(topics):
        return None
    return cast("asyncio.Future[Any]", client.set_topics(tracked | set(topics)))


def shared_entries(table: faust.Table) -> MutableMapping[str, bytes] | None:
    """The one mapping that holds all of a table's entries under ``memory://`` (the plain
    dict under Faust's store), else None: a database per partition (``rocksdb://``).

    The memory store is a ``FastUserDict`` over that dict: every ``get`` is two Python
    calls, and a miss (a new prediction id, the join's most common lookup) raises and
    catches a KeyError; about 3% of a busy worker's main thread. Faust recovers the
    table into the same dict, and clears it in place.
    """
    store = table.data
    inner = getattr(store, "data", None)
    if isinstance(store, faust.stores.memory.Store) and isinstance(inner, dict):
        return inner
    return None


def entries(table: faust.Table, partition: int) -> MutableMapping[str, bytes]:
    """The mapping ``models/`` keeps the entries of a table's ``partition`` in, which
    :func:`write` sends to that changelog partition: under ``memory://`` the dict of all
    partitions (:func:`shared_entries`), under ``rocksdb://`` the partition's database
    read through its unacknowledged changes (:class:`streams.durable.PartitionEntries`)."""
    partition_entries = getattr(table.data, "partition_entries", None)
    if partition_entries is not None:
        return cast(MutableMapping[str, bytes], partition_entries(partition))
    shared = shared_entries(table)
    if shared is None:
        raise TypeError(f"table {table.name!r}: a store of neither memory:// nor rocksdb://")
    return shared


def every_entry(table: faust.Table, partitions: Collection[int]) -> list[tuple[str, bytes]]:
    """The entries of ``partitions`` (under ``memory://``: of every partition held)."""
    shared = shared_entries(table)
    if shared is not None:
        return list(shared.items())
    return [item for partition in sorted(partitions)
            for item in entries(table, partition).items()]


def _kafka_producer(app: AppT) -> AIOKafkaProducer:
    """The aiokafka producer under Faust's (Faust keeps no public handle on it)."""
    producer = getattr(app.producer, "_producer", None)
    if producer is None:
        # Agents write only while the app runs, and Faust starts its producer first.
        raise RuntimeError("the Faust producer has not started")
    return cast(AIOKafkaProducer, producer)
