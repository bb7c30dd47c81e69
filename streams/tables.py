"""The worker's tables, declared in one place.

Both tables hold bytes that ``models/`` encodes: the join table compact orjson entries
(``models.join``), the models table one ``ModelState`` per model (``models.codec``).
Agents change ``table.data`` directly and then call :func:`write`, which sends each
changed key to the changelog partition of the input partition it came from, once per
batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

import faust
import faust.stores.memory
from aiokafka import AIOKafkaProducer
from faust.types import AppT

from streams.settings import Settings

__all__ = ["Tables", "declare_tables", "entries", "track_topics", "write"]


@dataclass(frozen=True)
class Tables:
    """The tables of this process's role (``None``: the other role's)."""

    join: faust.Table | None  # prediction id -> pending entry; one meta entry per partition
    models: faust.Table | None  # model -> ModelState; one marker per records partition


class _Table(faust.Table):
    """A Faust table whose changelog topic is named by the settings.

    Faust names it after the app id, which is also the consumer group; a role runs under
    a group of its own (``Settings.group``) but must read and write the same changelog
    as a worker running both stages.
    """

    changelog_name = ""

    def _changelog_topic_name(self) -> str:
        return self.changelog_name


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
    batch = producer.create_batch()
    for key, value in changes.items():
        raw_key = key.encode()
        if batch.append(timestamp=None, key=raw_key, value=value) is None:  # full
            acks.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            batch.append(timestamp=None, key=raw_key, value=value)  # a first one always fits
    if batch.record_count():
        acks.append(await producer.send_batch(batch, topic, partition=partition))
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


def entries(table: faust.Table) -> MutableMapping[str, bytes]:
    """The mapping ``models/`` keeps a table's entries in: the plain dict under Faust's
    in-memory store, else the store itself (RocksDB).

    The memory store is a ``FastUserDict`` over that dict: every ``get`` is two Python
    calls, and a miss (a new prediction id, the join's most common lookup) raises and
    catches a KeyError; about 3% of a busy worker's main thread. Faust recovers the
    table into the same dict, and clears it in place.
    """
    store = table.data
    inner = getattr(store, "data", None)
    if isinstance(store, faust.stores.memory.Store) and isinstance(inner, dict):
        return inner
    return cast(MutableMapping[str, bytes], store)


def _kafka_producer(app: AppT) -> AIOKafkaProducer:
    """The aiokafka producer under Faust's (Faust keeps no public handle on it)."""
    producer = getattr(app.producer, "_producer", None)
    if producer is None:
        # Agents write only while the app runs, and Faust starts its producer first.
        raise RuntimeError("the Faust producer has not started")
    return cast(AIOKafkaProducer, producer)
