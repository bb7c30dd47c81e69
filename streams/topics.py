"""Every topic driftwarden reads or writes, declared in one place (DESIGN.md section 2).

``ensure_topics`` runs before the worker starts: it creates missing topics and refuses to
go on when ``predictions`` and ``labels`` differ in partition count, because the join is
co-partitioned.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, for_code

from models.errors import ConfigError
from streams.settings import Settings

__all__ = ["REFERENCE_MAX_BYTES", "UNREACHABLE", "TopicNames", "ensure_topics",
           "unreachable"]


@dataclass(frozen=True)
class TopicNames:
    """Full names (prefix applied) of every topic."""

    predictions: str
    labels: str
    retraining: str
    references: str
    dead_letters: str
    model_records: str  # internal: join output keyed by model

    @classmethod
    def from_settings(cls, settings: Settings) -> TopicNames:
        t = settings.topic
        return cls(
            predictions=t("predictions"),
            labels=t("labels"),
            retraining=t("retraining"),
            references=t("references"),
            dead_letters=t("dead-letters"),
            model_records=t(f"{settings.app_id}-model-records"),
        )


#: Largest message the references topic takes (a profile of many categorical features
#: passes Kafka's default 1 MiB); the worker creates it with this ``max.message.bytes``.
REFERENCE_MAX_BYTES = 4 * 1024 * 1024

#: What a client's start raises when no bootstrap server answers.
UNREACHABLE = (TimeoutError, KafkaConnectionError, OSError)


def unreachable(settings: Settings, exc: BaseException) -> ConfigError:
    """The error for a client that could not reach the broker: names the variable."""
    return ConfigError(
        f"cannot reach Kafka at DRIFTWARDEN_BROKER={settings.broker!r}: {exc or 'timeout'}")


async def ensure_topics(settings: Settings, timeout: float = 30.0) -> int:
    """Create missing topics; return the partition count of the joined input topics.

    Raises
    ------
    ConfigError
        When the broker cannot be reached, or ``predictions`` and ``labels`` differ in
        partition count.
    """
    names = TopicNames.from_settings(settings)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=int(timeout * 1000),
        **settings.aiokafka_security(),
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
    except UNREACHABLE as exc:
        raise unreachable(settings, exc) from None
    try:
        existing = await _partition_counts(admin, [names.predictions, names.labels])
        joined = existing.get(names.predictions) or existing.get(names.labels)
        partitions = joined or settings.partitions
        wanted = {
            names.predictions: {},
            names.labels: {},
            # Topics users read are stored uncompressed whatever the worker's producer
            # sends (DRIFTWARDEN_COMPRESSION): any Kafka client reads them.
            names.retraining: {"compression.type": "uncompressed"},
            names.dead_letters: {"compression.type": "uncompressed"},
            # Stored compressed: one model's records share a partition and every
            # prediction's event travels in them, so a fetch of FETCH_BYTES was the model
            # stage's ceiling (1 MiB fetches: it ended 1.5-2 s behind the join on 200,000
            # events; zstd, ~4x smaller here: 0.1-0.2 s). The worker's producer already
            # sends zstd by default; this keeps the topic so under any
            # DRIFTWARDEN_COMPRESSION (the broker then recompresses).
            names.model_records: {"compression.type": "zstd"},
            names.references: {"cleanup.policy": "compact",
                               "max.message.bytes": str(REFERENCE_MAX_BYTES)},
        }
        present = set(await admin.list_topics())
        missing = [
            NewTopic(name, partitions, settings.replication_factor, topic_configs=config)
            for name, config in wanted.items()
            if name not in present
        ]
        if missing:
            _raise_refusal(settings, await admin.create_topics(missing))
        # Producing before every partition has a leader only earns retries and warnings;
        # the topics may also have just been created by another process.
        descs = await _wait_for_leaders(admin, list(wanted), timeout)
        if missing:
            created = {t.name for t in missing}
            await _wait_until_served(settings, [d for d in descs if d["topic"] in created],
                                     timeout)
        counts = {desc["topic"]: len(desc["partitions"]) for desc in descs}
        if counts[names.predictions] != counts[names.labels]:
            raise ConfigError(
                f"topic {names.predictions!r} has {counts[names.predictions]} partitions but "
                f"{names.labels!r} has {counts[names.labels]}; the join needs them equal"
            )
        return counts[names.predictions]
    finally:
        await admin.close()


#: The variable (and its Settings field) behind a topic creation the broker refuses with
#: this error code.
_CAUSES = {
    17: ("DRIFTWARDEN_TOPIC_PREFIX", "topic_prefix"),  # INVALID_TOPIC_EXCEPTION
    37: ("DRIFTWARDEN_PARTITIONS", "partitions"),  # INVALID_PARTITIONS
    38: ("DRIFTWARDEN_REPLICATION_FACTOR", "replication_factor"),  # INVALID_REPLICATION_FACTOR
    29: ("DRIFTWARDEN_SASL_USERNAME", "sasl_username"),  # TOPIC_AUTHORIZATION_FAILED
    31: ("DRIFTWARDEN_SASL_USERNAME", "sasl_username"),  # CLUSTER_AUTHORIZATION_FAILED
}


def _raise_refusal(settings: Settings, response: Any) -> None:
    """Raise a ConfigError for the first topic the broker refused to create.

    aiokafka's ``create_topics`` returns the broker's per-topic errors rather than raising
    them; unread, a refusal (a replication factor above the broker count, a denied ACL)
    showed 30 s later as topics without partition leaders, naming no cause.
    """
    for name, code, *message in response.topic_errors:
        if code in (0, 36):  # created; TOPIC_ALREADY_EXISTS: another worker won the race
            continue
        detail = f": {message[0]}" if message and message[0] else ""
        cause = _CAUSES.get(code)
        hint = f"; check {cause[0]}={getattr(settings, cause[1])!r}" if cause else ""
        raise ConfigError(f"the broker at DRIFTWARDEN_BROKER={settings.broker!r} refused to "
                          f"create topic {name!r}: {for_code(code).__name__}{detail}{hint}")


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for desc in await admin.describe_topics(topics):
        if desc.get("error_code", 0) == 0 and desc.get("partitions"):
            out[desc["topic"]] = len(desc["partitions"])
    return out


async def _wait_until_served(settings: Settings, descs: list[dict[str, Any]],
                             timeout: float) -> None:
    """Return once the leader of every partition of the described topics serves it.

    The broker publishes a new partition's leader in its metadata before it has created
    the partition's log; until then a produce to it is refused with
    ``NotLeaderForPartitionError``: an idle broker did so for some of 48 new partitions
    right after their leaders were named, and in CI, under load, for longer than the
    bench producer's 40 s request timeout (its records were dropped). A ListOffsets
    request is answered only by a leader that has the log, so once every partition
    answers one, producing works.
    """
    tps = [TopicPartition(desc["topic"], p["partition"])
           for desc in descs for p in desc["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                                request_timeout_ms=int(timeout * 1000),
                                **settings.aiokafka_security())
    await consumer.start()
    try:
        await consumer.end_offsets(tps)
    except KafkaTimeoutError:
        topics = [desc["topic"] for desc in descs]
        raise ConfigError(f"topics {topics} were created but the broker at "
                          f"DRIFTWARDEN_BROKER={settings.broker!r} did not serve all their "
                          f"partitions within {timeout:.0f}s") from None
    finally:
        await consumer.stop()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str],
                            timeout: float) -> list[dict[str, Any]]:
    """The descriptions of ``topics`` once every partition of theirs has a leader."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        descs = await admin.describe_topics(topics)
        if all(desc.get("error_code", 0) == 0 and desc.get("partitions")
               and all(p.get("leader", -1) >= 0 for p in desc["partitions"])
               for desc in descs):
            return descs
        if asyncio.get_running_loop().time() > deadline:
            raise ConfigError(f"topics {topics} have no partition leaders after {timeout:.0f}s")
        await asyncio.sleep(0.1)
