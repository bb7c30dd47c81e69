"""The ``rocksdb://`` table store: the tables on disk, a RocksDB database per changelog
partition, each holding exactly what its changelog acknowledged.

Imported only when ``DRIFTWARDEN_STORE=rocksdb://`` (``streams.tables``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, MutableMapping
from typing import Any, cast

import faust.stores.rocksdb
import rocksdict
from aiokafka import TopicPartition
from faust.types import TP

from streams.settings import Settings
from streams.tables import ChangelogReader

__all__ = ["TOMBSTONES_KEPT_SECONDS", "DurableStore", "Held", "PartitionEntries"]

log = logging.getLogger(__name__)

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
               last: int, contiguous: bool = True) -> None:
        """Write ``changes``, which the changelog acknowledged at offsets ``first`` to
        ``last`` (``contiguous``: no other writer's records among them), to the database
        in one batch; they leave ``pending`` unless changed again since.

        Once the partition was revoked, nothing: its database is its next owner's to read
        (a write sent by a timer may be acknowledged after a rebalance began). A database
        that holds the changelog past ``last`` already (a reading since the write was
        sent) is left as it is. One that did not hold it up to ``first - 1`` (another
        writer's records in between) takes the changes without an offset, and loses the
        offset it had: it no longer holds a prefix of its changelog, and is read again
        from the start when next assigned.
        """
        if self.held.revoked:
            return
        db = self._open_db(self.partition)
        raw = db.get(_OFFSET_KEY)
        held_to = None if raw is None else int(raw)
        if held_to is None or held_to < last:
            batch = rocksdict.WriteBatch(raw_mode=True)
            for key, value in changes:
                if value is None:
                    batch.delete(key.encode())
                else:
                    batch.put(key.encode(), value)
            # held_to >= first: a reading applied some of them already (the same values)
            if contiguous and held_to is not None and held_to + 1 >= first:
                _mark(batch, last)
            else:
                for mark in _MARKS:
                    batch.delete(mark)
                if held_to is not None:
                    log.warning("changelog partition %d: written at offsets %d-%d while the "
                                "database held it to %d; it is read again from the start "
                                "when next assigned", self.partition, first, last, held_to)
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


class DurableStore(ChangelogReader, faust.stores.rocksdb.Store):
    """Faust's RocksDB store (a database per changelog partition, with the changelog
    offset it holds), read by :class:`ChangelogReader` from that offset on, and written
    only through :class:`PartitionEntries`: Faust's own writes take the partition from
    the event being processed, and the worker takes its input a fetch at a time, outside
    Faust's events."""

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self._held: dict[int, Held] = {}
        # Per partition, the latest write's commit: each waits for the one before.
        self._commits: dict[int, asyncio.Future[None]] = {}

    def partition_entries(self, partition: int) -> PartitionEntries:
        """The view of ``partition``'s entries. Of a partition this worker is not active
        for (a timer's write after a rebalance began), one whose commits write nothing."""
        held = self._held.get(partition)
        if held is None:
            held = Held()
            topic = self.table.changelog_topic.get_topic_name()
            if any(tp.topic == topic and tp.partition == partition
                   for tp in self.app.assignor.assigned_actives()):
                self._held[partition] = held
            else:
                held.revoked = True
        return PartitionEntries(self._db_for_partition, partition, held)

    def commit_when_acked(self, partition: int, changes: list[tuple[str, bytes | None]],
                          acks: list[Awaitable[Any]], counts: list[int]
                          ) -> Awaitable[None]:
        """Commit ``changes`` to the partition's database once their ``acks`` (record
        batches of ``counts`` records) resolve, after the partition's earlier writes.
        A writer cancelled while it waits does not cancel the commit: the next one would
        find a gap."""
        future = asyncio.ensure_future(_committed(
            self.partition_entries(partition), changes, acks, counts,
            self._commits.get(partition)))
        self._commits[partition] = future
        return asyncio.shield(future)

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Faust's recovery, when it reads what :class:`ChangelogReader` left: the offset
        with the time, as every write here records it."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        _mark(batch, offset)
        self._db_for_partition(tp.partition).write(batch)

    def _visible_items(self, db: Any) -> Iterator[tuple[bytes, bytes]]:
        return ((k, v) for k, v in super()._visible_items(db) if k not in _MARKS)

    def _visible_keys(self, db: Any) -> Iterator[bytes]:
        return (k for k in super()._visible_keys(db) if k not in _MARKS)

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
        if (offset is None or synced is None
                or time.time() - float(synced) > TOMBSTONES_KEPT_SECONDS):
            return None
        return int(offset)

    def _restart(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            db = self._db_for_partition(tp.partition)
            batch = rocksdict.WriteBatch(raw_mode=True)
            n = 0
            for key in db.keys():  # noqa: SIM118 (an Rdict iterates no keys)
                batch.delete(key)
                n += 1
            if n:
                log.info("%s[%d]: the database's %d keys are not known to hold its changelog "
                         "(no offset, or last in step over %.0f h ago): read from the start",
                         tp.topic, tp.partition, n, TOMBSTONES_KEPT_SECONDS / 3600)
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
        self.set_persisted_offset(cast(TP, tp), offset)


async def _committed(entries: PartitionEntries, changes: list[tuple[str, bytes | None]],
                     acks: list[Awaitable[Any]], counts: list[int],
                     before: asyncio.Future[None] | None) -> None:
    """Once the changelog has acknowledged ``changes``, and the write ``before`` them is
    committed, write them to the database."""
    sent = await asyncio.gather(*acks)
    if before is not None:
        await asyncio.wait([before])  # its failure is its own writer's to raise
    # The producer waits for every replica (acks=-1, streams.app): each batch has its
    # base offset. Another writer's batch between two of these would be a gap.
    contiguous = all(b.offset == a.offset + n
                     for a, b, n in zip(sent, sent[1:], counts, strict=False))
    entries.commit(changes, sent[0].offset, sent[-1].offset + counts[-1] - 1, contiguous)
