"""Where a worker's consumer group starts when a deployment changes its layout.

A deployment runs both stages in every worker (``DRIFTWARDEN_ROLE=all``, consumer group
``APP_ID``) or each stage in processes of its own (``join``: ``APP_ID-join``, reading
``predictions`` and ``labels``; ``monitor``: ``APP_ID-monitor``, reading the records
topic). Both layouts keep their state in the same changelogs (``streams.tables``), and a
committed offset implies that the state it covers is written (``streams.agents``). So
before it joins its group, a worker:

1. refuses to start while workers of the other layout read the same topics: two
   owners of one partition's state would both write it;
2. moves its group's offsets up to the furthest the other layout's groups committed,
   partition by partition. Without this a switched deployment would read its whole
   retained input again (skipped as replays, but read).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from models.errors import ConfigError
from streams.settings import ROLES, Settings
from streams.topics import TopicNames

__all__ = ["prepare_group", "role_topics"]

log = logging.getLogger(__name__)


def role_topics(settings: Settings) -> set[str]:
    """The topics a worker of ``settings.role`` consumes (besides ``references``)."""
    names = TopicNames.from_settings(settings)
    read = {"join": {names.predictions, names.labels}, "monitor": {names.model_records}}
    return set().union(*(read[stage] for stage in settings.stages))


async def prepare_group(settings: Settings, timeout: float = 60.0) -> dict[TopicPartition, int]:
    """Check that no other layout is running, then align this role's group offsets.

    Returns the offsets committed for this role's group (empty when it was already as
    far as every other layout's group).

    Raises
    ------
    ConfigError
        When a group of the other layout still has members after
        ``DRIFTWARDEN_SESSION_TIMEOUT_SECONDS`` (a worker killed without stopping stays a
        member that long), or the groups cannot be read within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await _prepare(settings)
        except KafkaError as exc:
            # A fresh broker answers COORDINATOR_NOT_AVAILABLE until it has made its
            # offsets topic; other retriable errors pass the same way.
            if not exc.retriable or time.monotonic() > deadline:
                raise ConfigError(f"cannot read the consumer groups of "
                                  f"DRIFTWARDEN_APP_ID={settings.app_id!r}: {exc!r}") from None
            await asyncio.sleep(0.5)


async def _prepare(settings: Settings) -> dict[TopicPartition, int]:
    mine = role_topics(settings)
    others = {}
    for role in ROLES:
        if role != settings.role:
            other = replace(settings, role=role)
            if role_topics(other) & mine:
                others[other.group] = role
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers,
                                **settings.aiokafka_security())
    await admin.start()
    try:
        await _wait_until_idle(admin, others, settings)
        own = await admin.list_consumer_group_offsets(settings.group)
        ahead: dict[TopicPartition, int] = {}
        for group in others:
            for tp, committed in (await admin.list_consumer_group_offsets(group)).items():
                if tp.topic in mine and committed.offset > max(
                        ahead.get(tp, -1), own[tp].offset if tp in own else -1):
                    ahead[tp] = committed.offset
    finally:
        await admin.close()
    if ahead:
        await _commit(settings, ahead)
    return ahead


async def _wait_until_idle(admin: AIOKafkaAdminClient, others: dict[str, str],
                           settings: Settings) -> None:
    deadline = time.monotonic() + settings.session_timeout_seconds + 5.0
    while True:
        busy = []
        for name in others:  # one group per request: aiokafka 0.14 misreads a response
            # describing two groups (its client then closes the connection)
            for response in await admin.describe_consumer_groups([name]):
                busy += [(group, members) for _, group, _, _, _, members, *_ in response.groups
                         if members]
        if not busy:
            return
        if time.monotonic() > deadline:
            group, members = busy[0]
            raise ConfigError(
                f"consumer group {group!r} has {len(members)} member(s): workers with "
                f"DRIFTWARDEN_ROLE={others[group]} read the topics this "
                f"DRIFTWARDEN_ROLE={settings.role} worker would; stop them first (one killed "
                f"without stopping leaves the group after DRIFTWARDEN_SESSION_TIMEOUT_SECONDS)")
        await asyncio.sleep(1.0)


async def _commit(settings: Settings, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                                group_id=settings.group, enable_auto_commit=False,
                                **settings.aiokafka_security())
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(offset, "")
                               for tp, offset in offsets.items()})
        log.warning("consumer group %s starts where the other layout's groups left off, on "
                    "%d partitions (their state is in the same changelogs)", settings.group,
                    len(offsets))
    except KafkaError as exc:
        # The group has members already: another worker of this role started first and
        # the group runs from its own offsets, aligned by that worker.
        log.info("consumer group %s: offsets not moved (%s)", settings.group, exc)
    finally:
        await consumer.stop()
