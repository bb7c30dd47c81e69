"""The worker's tables, declared in one place.

Both tables hold bytes that ``models/`` encodes: the join table compact orjson entries
(``models.join``), the models table one ``ModelState`` per model (``models.codec``).
Agents change ``table.data`` directly and then call :func:`write`, which sends each
changed key to the changelog partition of the input partition it came from, once per
batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import faust

__all__ = ["Tables", "declare_tables", "write"]


@dataclass(frozen=True)
class Tables:
    join: faust.Table  # prediction id -> pending entry; one meta entry per partition
    models: faust.Table  # model name -> ModelState


def declare_tables(app: faust.App, partitions: int) -> Tables:
    def table(name: str, help_: str) -> faust.Table:
        table = cast(faust.Table, app.Table(
            name, partitions=partitions, key_type=str, value_type=bytes, help=help_,
            # A join batch's write-ahead entry is one message: allow what the producer does.
            extra_topic_configs={"max.message.bytes": str(4 * 1024 * 1024)},
        ))
        # Faust would JSON-encode both. Values are the bytes models/ encoded: recovery
        # must hand them back untouched. The changelog topic object was already made (by
        # the table manager) with JSON serializers: make it again with these.
        table.key_serializer = "utf8"
        table.value_serializer = "raw"
        table.changelog_topic = table._new_changelog_topic()
        return table

    return Tables(
        join=table("join", "Predictions waiting for labels (and labels for predictions)"),
        models=table("models", "Per-model monitoring state"),
    )


async def write(table: faust.Table, partition: int,
                changes: Mapping[str, bytes | None]) -> list[Awaitable[Any]]:
    """Send changes already applied in ``table.data`` to the changelog; return the acks.

    Sent straight through the producer rather than Faust's per-key changelog buffer,
    which produces one message at a time and throttles the stream when it fills.
    """
    topic = table.changelog_topic.get_topic_name()
    send = table.app.producer.send
    return [await send(topic, key.encode(), value, partition, None, None)
            for key, value in changes.items()]
