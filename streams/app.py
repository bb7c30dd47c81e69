"""The Faust application: one per worker process, built from Settings.

The partition count is an argument because the tables' changelogs must match the
co-partitioned input topics, whose count ``streams.topics.ensure_topics`` reads first.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from faust.serializers import codecs

from streams.settings import Settings

__all__ = ["create_app"]


class _Utf8(codecs.Codec):
    """Table keys are str in memory and UTF-8 on the changelog."""

    def _dumps(self, obj: Any) -> bytes:
        return obj.encode() if isinstance(obj, str) else bytes(obj)

    def _loads(self, s: bytes) -> Any:
        return s.decode()


codecs.register("utf8", _Utf8())


class Worker(faust.Worker):
    """Faust's worker without its terminal spinner.

    At the default log level (WARN) the spinner sets the root logger to DEBUG so that it
    spins on every record: each debug line of aiokafka (one per message produced) then
    builds a LogRecord that no handler prints, about 5% of a busy worker's time. (Named
    ``Worker`` because Faust's log lines carry the class name: ``[^Worker]: Ready``.)
    """

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None
        super().on_setup_root_logger(logger, level)


def _credentials(settings: Settings) -> Any:
    if settings.security_protocol == "PLAINTEXT":
        return None
    ssl_context = settings.aiokafka_security().get("ssl_context")
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=ssl_context,
        )
    return faust.SSLCredentials(ssl_context)


def create_app(settings: Settings, partitions: int) -> faust.App:
    """Faust app with driftwarden's defaults: loopback web server, no standby replicas."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        # The prefix isolates deployments (and test runs) sharing a cluster: it names the
        # consumer group and the changelog topics too.
        settings.topic(settings.app_id),
        broker=settings.broker,
        broker_credentials=_credentials(settings),
        store=settings.store,
        datadir=str(settings.data_dir),
        topic_partitions=partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        # Standbys would export another worker's models; recovery reads the changelog.
        table_standby_replicas=0,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        # The table and router pages would serve prediction ids and state to anyone who
        # reaches the port; the graph page is a debugging aid. Off.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_graph_enabled=False,
        # A worker that dies is noticed after this long and its partitions move on; the
        # heartbeats run in the consumer's own thread, so busy agents do not miss them.
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=settings.session_timeout_seconds / 3,
        producer_acks=-1,
        producer_max_request_size=4 * 1024 * 1024,
        # Small per-partition fetches keep partitions progressing evenly when catching up.
        consumer_max_fetch_size=128 * 1024,
        broker_max_poll_records=settings.batch_size,
        stream_buffer_maxsize=max(4096, 4 * settings.batch_size),
        key_serializer="raw",
        value_serializer="raw",
        Worker=Worker,
    )
