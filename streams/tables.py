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
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

import faust
import faust.stores.memory
import faust.stores.rocksdb
import rocksdict
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.types import TP, AppT

from streams.settings import Settings

__all__ = ["Held", "PartitionEntries", "Tables", "declare_tables", "entries", "every_entry",
           "shared_entries", "track_topics", "write"]

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
    :class:`_PreloadingStore`, under ``rocksdb://`` a :class:`_DurableStore`.
    """

    changelog_name = ""
    settings: Settings | None = None

    def _changelog_topic_name(self) -> str:
        return self.changelog_name

    def _new_store_by_url(self, url: Any) -> Any:
        if str(url).startswith("memory:") and self.settings is not None:
            return _PreloadingStore(
                url, self.app, self, table_name=self.name, key_type=self.key_type,
                key_serializer=self.key_serializer, value_serializer=self.value_serializer,
                value_type=self.value_type, loop=self.loop, options=self.options,
                settings=self.settings)
        if str(url).startswith("rocksdb:") and self.settings is not None:
            return _DurableStore(
                url, self.app, self, table_name=self.name, key_type=self.key_type,
                key_serializer=self.key_serializer, value_serializer=self.value_serializer,
                value_type=self.value_type, loop=self.loop, options=self.options,
                settings=self.settings)
        return super()._new_store_by_url(url)


#: Longest a rebalance spends reading changelogs itself (Faust's rebalance timeout is 60 s);
#: Faust's recovery reads what is left, from where this stopped.
READ_BUDGET_SECONDS = 20.0


class _ChangelogReader:
    """A store that reads its active changelog partitions itself, a fetch at a time,
    before Faust's recovery starts, and tells the recovery where it got to
    (``persisted_offset``), so that the recovery finds nothing left to read.

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

    def _actives(self, generation_id: int) -> set[TopicPartition] | None:
        """The changelog partitions this worker is active for; None while a newer
        rebalance is under way (Faust's recovery skips this one too)."""
        if generation_id != self.app.consumer_generation_id:
            return None
        topic = self.table.changelog_topic.get_topic_name()
        return {TopicPartition(tp.topic, tp.partition)
                for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    async def _read_logged(self, actives: set[TopicPartition]) -> None:
        if not actives:
            return
        new = sum(1 for tp in actives if self._held_offset(tp) is None)
        started = time.monotonic()
        n = await self._read(actives, started + READ_BUDGET_SECONDS)
        log.info("%s: read %d changelog records of %d partitions (%d newly assigned) "
                 "in %.1f s before recovery", self.table.changelog_topic.get_topic_name(),
                 n, len(actives), new, time.monotonic() - started)

    async def _read(self, tps: set[TopicPartition], deadline: float) -> int:
        """Read ``tps`` up to their ends into the store; return how many records."""
        settings = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
            group_id=None, max_partition_fetch_bytes=settings.fetch_bytes,
            # Where the log no longer reaches back to held + 1: from its start.
            auto_offset_reset="earliest", **settings.aiokafka_security())
        n = 0
        try:
            # Held nothing of: the changelog alone says what they hold, from its start.
            held = {tp: self._held_offset(tp) for tp in tps}
            new = {tp for tp, offset in held.items() if offset is None}
            self._restart(new)
            await consumer.start()
            consumer.assign(list(tps))
            ends = await consumer.end_offsets(list(tps))
            # So too a changelog that no longer reaches where the last reading ended
            # (deleted and made again).
            gone = {tp for tp in tps - new if ends[tp] <= cast(int, held[tp])}
            self._restart(gone)
            new |= gone
            after = {tp: -1 if tp in new else cast(int, held[tp]) for tp in tps}
            for tp in new:
                await consumer.seek_to_beginning(tp)
            for tp in tps - new:
                consumer.seek(tp, after[tp] + 1)
            pending = {tp for tp in tps if ends[tp] > after[tp] + 1}
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{READ_BUDGET_SECONDS:g} s passed")
                fetched = await consumer.getmany(*pending, timeout_ms=1000)
                for tp, records in fetched.items():
                    if records:
                        self._apply(tp, records)
                        n += len(records)
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
            for tp in tps:
                self._reached(tp, ends[tp] - 1)
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


class _PreloadingStore(_ChangelogReader, faust.stores.memory.Store):
    """Faust's in-memory store, read by :class:`_ChangelogReader`. A partition newly
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
        actives = self._actives(generation_id)
        if actives is None:
            return
        self._held = {tp.partition for tp in actives}
        for tp in set(self._read_to) - actives:
            del self._read_to[tp]
        await self._read_logged(actives)

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


_ABSENT: Any = object()


class PartitionEntries(MutableMapping[str, bytes]):
    """One changelog partition's entries under ``rocksdb://``: its RocksDB database, seen
    through the changes the changelog has not acknowledged yet.

    A change goes into ``pending`` when it is made (None: deleted) and into the database
    once the changelog has acknowledged it (:meth:`commit`), in one RocksDB write batch
    with the changelog offset it reached. So the database holds what the changelog holds
    up to that offset, and nothing more: after a kill -9 Faust's recovery reads on from
    the offset, and the input is replayed from its committed offsets onto the state of
    the changelog, as under ``memory://``. A database written at once would run ahead of
    its changelog: a replayed batch would meet its own predictions and take them for
    duplicates, and find outcomes absorbed whose records were never sent.

    Parameters
    ----------
    open_db
        The partition's database by partition (Faust's store opens it on first use).
    partition
        The changelog partition, which is the input partition its entries came from.
    held
        What the worker holds of the partition since it was assigned: its unacknowledged
        changes, shared by every view of it.
    """

    __slots__ = ("_open_db", "held", "partition", "pending")

    def __init__(self, open_db: Callable[[int], Any], partition: int, held: Held) -> None:
        self._open_db = open_db
        self.partition = partition
        self.held = held
        self.pending = held.pending

    def get(self, key: str, default: Any = None) -> Any:
        value = self.pending.get(key, _ABSENT)
        if value is _ABSENT:
            value = self._open_db(self.partition).get(key.encode())
        return default if value is None else value

    def __getitem__(self, key: str) -> bytes:
        value: bytes | None = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: bytes) -> None:
        self.pending[key] = value

    def __delitem__(self, key: str) -> None:
        if self.get(key) is None:
            raise KeyError(key)
        self.pending[key] = None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def items(self) -> Iterator[tuple[str, bytes]]:  # type: ignore[override]
        """Every entry, the database's read through ``pending``, in no set order."""
        pending = self.pending
        for raw_key, value in self._open_db(self.partition).items():
            if raw_key in _MARKS:
                continue
            key = raw_key.decode()
            if key not in pending:
                yield key, value
        yield from ((k, v) for k, v in list(pending.items()) if v is not None)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self.items())

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def commit(self, changes: Collection[tuple[str, bytes | None]], first: int,
               last: int) -> None:
        """Write ``changes``, which the changelog acknowledged at offsets ``first`` to
        ``last``, to the database in one batch; they leave ``pending`` unless changed
        again since.

        Once the partition was revoked, nothing: its database is its next owner's to read
        (a write sent by a timer may be acknowledged after a rebalance began). When the
        database did not hold the changelog up to ``first - 1`` (another writer's records
        in between), the changes are written without an offset, and the offset the
        database had is removed: it no longer holds a prefix of its changelog, and is
        read again from the start when next assigned.
        """
        if self.held.revoked:
            return
        db = self._open_db(self.partition)
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in changes:
            if value is None:
                batch.delete(key.encode())
            else:
                batch.put(key.encode(), value)
        held_to = db.get(_OFFSET_KEY)
        if held_to is not None and int(held_to) + 1 == first:
            _mark(batch, last)
        else:
            for mark in _MARKS:
                batch.delete(mark)
            if held_to is not None:
                log.warning("changelog partition %d: written at offset %d while the "
                            "database held it to %s; it is read again from the start when "
                            "next assigned", self.partition, first, held_to.decode())
        db.write(batch)
        pending = self.pending
        for key, value in changes:
            if pending.get(key, _ABSENT) is value:
                del pending[key]


class Held:
    """What a worker holds of one changelog partition under ``rocksdb://``, from its
    assignment to its revocation."""

    __slots__ = ("pending", "revoked")

    def __init__(self) -> None:
        self.pending: dict[str, bytes | None] = {}  # unacknowledged changes; None: deleted
        self.revoked = False


#: Where Faust's store keeps the last changelog offset a database holds.
_OFFSET_KEY: bytes = faust.stores.rocksdb.Store.offset_key
#: When the database last held its changelog's state (Unix time).
_SYNCED_KEY = b"__driftwarden\x00synced__"
_MARKS = frozenset({_OFFSET_KEY, _SYNCED_KEY})
#: A database last in step with its changelog longer ago than this is read again from the
#: changelog's start: Kafka's log cleaner drops a tombstone from a compacted topic once
#: ``delete.retention.ms`` has passed (24 h by default, the changelogs keep the
#: default), so a deletion made since could be gone and the entry would live on here.
TOMBSTONES_KEPT_SECONDS = 23 * 3600.0


def _mark(batch: Any, offset: int) -> None:
    """Have ``batch`` record that its database holds the changelog up to ``offset``, now."""
    batch.put(_OFFSET_KEY, str(offset).encode())
    batch.put(_SYNCED_KEY, repr(time.time()).encode())


class _DurableStore(_ChangelogReader, faust.stores.rocksdb.Store):
    """Faust's RocksDB store (a database per changelog partition, with the changelog
    offset it holds), read by :class:`_ChangelogReader` from that offset on, and written
    only through :class:`PartitionEntries`: Faust's own writes take the partition from
    the event being processed, and the worker takes its input a fetch at a time, outside
    Faust's events."""

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self._held: dict[int, Held] = {}
        # Per partition, the latest write's commit: each waits for the one before.
        self._commits: dict[int, asyncio.Future[None]] = {}

    def entries(self, partition: int) -> PartitionEntries:
        held = self._held.get(partition)
        if held is None:
            held = self._held[partition] = Held()
        return PartitionEntries(self._db_for_partition, partition, held)

    def committed(self, partition: int, changes: list[tuple[str, bytes | None]],
                  acks: list[Awaitable[Any]], counts: list[int]) -> asyncio.Future[None]:
        """Commit ``changes`` to the partition's database once their ``acks`` (record
        batches of ``counts`` records) resolve, after the partition's earlier writes."""
        future = asyncio.ensure_future(_committed(
            self.entries(partition), changes, acks, counts, self._commits.get(partition)))
        self._commits[partition] = future
        return future

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP],
                           newly_assigned: set[TP], generation_id: int = 0) -> None:
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        actives = self._actives(generation_id)
        if actives:
            await self._read_logged(actives)

    def revoke_partitions(self, table: Any, tps: set[TP]) -> None:
        for tp in tps:
            if tp.topic in table.changelog_topic.topics:
                held = self._held.pop(tp.partition, None)
                if held is not None:
                    held.revoked = True
        super().revoke_partitions(table, tps)

    def _held_offset(self, tp: TopicPartition) -> int | None:
        db = self._db_for_partition(tp.partition)
        offset, synced = db.get(_OFFSET_KEY), db.get(_SYNCED_KEY)
        if offset is None or synced is None:
            return None
        if time.time() - float(synced) > TOMBSTONES_KEPT_SECONDS:
            log.info("%s[%d]: the database was last in step with it %.1f h ago: read "
                     "from the start", self.table.changelog_topic.get_topic_name(),
                     tp.partition, (time.time() - float(synced)) / 3600)
            return None
        return int(offset)

    def _restart(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            db = self._db_for_partition(tp.partition)
            batch = rocksdict.WriteBatch(raw_mode=True)
            for key in db.keys():  # noqa: SIM118 (an Rdict iterates no keys)
                batch.delete(key)
            db.write(batch)

    def _apply(self, tp: TopicPartition, records: list[Any]) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        for rec in records:
            if rec.key is None:
                continue
            if rec.value is None:
                batch.delete(rec.key)
            else:
                batch.put(rec.key, rec.value)
        _mark(batch, records[-1].offset)
        self._db_for_partition(tp.partition).write(batch)

    def _reached(self, tp: TopicPartition, offset: int) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        _mark(batch, offset)
        self._db_for_partition(tp.partition).write(batch)


async def _committed(entries: PartitionEntries, changes: list[tuple[str, bytes | None]],
                     acks: list[Awaitable[Any]], counts: list[int],
                     before: asyncio.Future[None] | None) -> None:
    """Once the changelog has acknowledged ``changes``, and the write ``before`` them is
    committed, write them to the database."""
    sent = await asyncio.gather(*acks)
    if before is not None:
        await asyncio.wait([before])  # its failure is its own writer's to raise
    # The producer waits for every replica (acks=-1, streams.app): each batch has its offset.
    entries.commit(changes, sent[0].offset, sent[-1].offset + counts[-1] - 1)


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
    store = table.data
    if isinstance(store, _DurableStore) and acks:
        return [store.committed(partition, list(changes.items()), acks, counts)]
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
    read through its unacknowledged changes (:class:`PartitionEntries`)."""
    store = table.data
    if isinstance(store, _DurableStore):
        return store.entries(partition)
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
