"""The Faust application: one per worker process, built from Settings.

The partition count is an argument because the tables' changelogs must match the
co-partitioned input topics, whose count ``streams.topics.ensure_topics`` reads first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from operator import attrgetter
from time import monotonic
from typing import Any, cast

import faust
from faust.serializers import codecs
from faust.transport.drivers import aiokafka as kafka_driver
from faust.types import TP, Message, TransportT
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from streams.settings import Settings
from streams.tables import TableManager

__all__ = ["App", "BatchConsumer", "create_app"]

#: Takes the records of one fetch as ``(partition, aiokafka ConsumerRecords)``, topic by
#: topic; returns once they are processed and their results written (the consumer
#: acknowledges them after). A record's ``timestamp`` is in milliseconds.
BatchHandler = Callable[[list[tuple[TP, list[Any]]]], Awaitable[None]]


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


#: Longest a fetch request waits on the broker for data (Faust's consumer: 1,500 ms).
FETCH_WAIT_MS = 100


#: Longest the first batch topic's partition may hand nothing over while records of a
#: later one wait for it (see :meth:`_ConsumerThread._fetch_records`); they then go on.
HOLD_SECONDS = 10.0


def releasable(timestamps: Iterable[int], lead: int | None) -> int:
    """How many of a partition's held records go on, given their timestamps in offset
    order and the newest timestamp handed over from the same partition of the first batch
    topic (None: nothing yet): those before the first not published before ``lead``.

    Once the first topic has handed over a record published after a held one, every
    record published before the held one there has been handed over too (a producer's
    timestamps rise with its offsets), whichever came in the same millisecond. Reads no
    further than it releases.

    >>> releasable([5, 6, 8, 7, 9], lead=8)  # offset order is kept
    2
    >>> releasable([5, 7], lead=None)
    0
    """
    if lead is None:
        return 0
    n = 0
    for ts in timestamps:
        if ts >= lead:
            break
        n += 1
    return n


_TIMESTAMP = attrgetter("timestamp")


class _Held:
    """Records of one partition taken from aiokafka and not handed over yet."""

    __slots__ = ("records", "since")

    def __init__(self, since: float) -> None:
        self.records: list[Any] = []
        self.since = since


class _ConsumerThread(kafka_driver.AIOKafkaConsumerThread):
    """Faust's consumer thread, its aiokafka consumer waiting at most FETCH_WAIT_MS, the
    batch route's topics handed over in step.

    aiokafka keeps one fetch request in flight per broker, and leaves out of it the
    partitions whose records still wait to be handed over. Once the inputs were read, the
    records topic's partition was often left out of a request that then idled on the
    broker for the whole 1,500 ms: the model stage got data about once a second (100,000
    predictions: 17,884-23,819 events/s, 22,869-23,518 with 100 ms).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Records of the later batch topics (labels) waiting for the first (predictions).
        self._held: dict[TP, _Held] = {}
        # Per partition of the first batch topic: the newest timestamp it handed over, and
        # when (monotonic).
        self._lead: dict[int, tuple[int, float]] = {}

    def _create_worker_consumer(self, transport: kafka_driver.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust passes neither setting through (App.fetch_min_bytes says why the minimum).
        consumer._fetch_max_wait_ms = FETCH_WAIT_MS
        consumer._fetch_min_bytes = cast(App, self.app).fetch_min_bytes
        return consumer

    async def _fetch_records(self, consumer: Any, active_partitions: set[TP],
                             timeout: float | None = None,
                             max_records: int | None = None) -> Any:
        """Hand over the fetched records of stream topics (the model stage's) before the
        batch route's (the join's), and the batch route's later topics no further than
        its first.

        aiokafka drains its fetched partitions in the order their data arrived, up to
        ``max_records`` per call, and fetches a partition again only once it is drained.
        With the inputs' backlog ahead of it in that order, the records partition was
        served one fetch per pass over every input partition (one 1 MiB fetch every
        ~0.4 s while the join read 40,000 events/s): the model stage starved while the
        join ran, and caught up only after it.

        A fetch takes up to ``DRIFTWARDEN_FETCH_BYTES`` of each partition, and a label is
        a tenth of a prediction's size: over a backlog (a worker catching up after
        downtime) every fetch brought ten labels per prediction, and the join read the
        labels topic to its end before the predictions they belong to, keeping each
        label as a join entry until its prediction came: state in proportion to the
        backlog. So, as Kafka Streams does for the partitions of one task, a record of a
        later batch topic waits until the same partition of the first has handed over a
        record published after it (by Kafka timestamp: :func:`releasable`), or is read
        to its end (its position at its high watermark), or has handed nothing over for
        HOLD_SECONDS. A partition with waiting records is left out of fetching meanwhile,
        so what waits is at most one fetch per partition. Once the inputs are read to
        their ends (a worker keeping up) nothing waits.
        """
        fetched = consumer._fetcher._records  # an OrderedDict: aiokafka has no public view
        batch_topics = cast(App, self.app).batch_topics
        for tp in [tp for tp in fetched if tp.topic not in batch_topics]:
            fetched.move_to_end(tp, last=False)
        if len(batch_topics) < 2:
            return await super()._fetch_records(consumer, active_partitions, timeout=timeout,
                                                max_records=max_records)
        lead_topic, later = batch_topics[0], set(batch_topics[1:])
        out: dict[Any, list[Any]] = self._release(consumer, lead_topic, max_records)
        wanted = {tp for tp in active_partitions if tp not in self._held}
        records: dict[Any, list[Any]] = {}
        if wanted:  # an empty set would mean every partition to aiokafka
            records = dict(await super()._fetch_records(
                consumer, wanted, timeout=0 if out else timeout, max_records=max_records))
        elif not out and timeout:
            await asyncio.sleep(min(timeout, FETCH_WAIT_MS / 1000))
        now = monotonic()
        for tp in list(records):
            if tp.topic == lead_topic:
                self._lead[tp.partition] = (records[tp][-1].timestamp, now)
            elif tp.topic in later:
                self._held.setdefault(tp, _Held(now)).records += records.pop(tp)
        room = None if max_records is None else max(
            0, max_records - sum(map(len, records.values())))
        for tp, released in self._release(consumer, lead_topic, room).items():
            out[tp] = out.get(tp, []) + released
        records.update(out)  # the later topics' records all went through what is held
        return records

    def _release(self, consumer: Any, lead_topic: str, limit: int | None) -> dict[Any, list[Any]]:
        """The held records that may go on now (:func:`releasable`), up to ``limit``."""
        out: dict[Any, list[Any]] = {}
        now = monotonic()
        for tp, held in list(self._held.items()):
            if limit is not None and limit <= 0:
                break
            lead_ts, moved = self._lead.get(tp.partition, (None, held.since))
            if (now - max(moved, held.since) > HOLD_SECONDS
                    or _read_to_end(consumer, TP(lead_topic, tp.partition))):
                n = len(held.records)
            else:
                n = releasable(map(_TIMESTAMP, held.records), lead_ts)
            if limit is not None:
                n = min(n, limit)
                limit -= n
            if n:
                out[tp] = held.records[:n]
                del held.records[:n]
            if not held.records:
                self._held.pop(tp, None)
        return out

    def _forget_held(self) -> None:
        """Records taken but not handed over are fetched again after a seek or a
        rebalance (the consumer goes back to the committed offsets)."""
        self._held.clear()
        self._lead.clear()

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self._forget_held()
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        self._forget_held()
        await super().on_partitions_assigned(assigned, generation_id)

    def seek(self, partition: TP, offset: int) -> None:
        self._held.pop(partition, None)
        super().seek(partition, offset)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        # In the consumer's thread, between two fetches: none is half-way through.
        return cast(Mapping[TP, int], await self.call_thread(self._forget_and_seek))

    async def _forget_and_seek(self) -> Mapping[TP, int]:
        """Forget what is held and go back to the committed offsets; where the group has
        committed none yet, to where the consumer started (its offset reset policy).

        aiokafka's ``seek_to_committed`` seeks only the partitions whose committed offset
        is above 0 and leaves the others where the fetches left them: past the records
        of a dropped fetch, or of labels held here. A worker started after one killed
        before its first commit dropped a fetch that way (a seek had begun meanwhile),
        and its predictions were never read again: the kill -9 test waited 90 s for 811
        of them (1 in 5 runs on a development broker; once in CI). A table's changelog,
        which Faust's recovery reads and never commits, is left as it is.
        """
        self._forget_held()
        consumer = self._ensure_consumer()
        committed = cast(Mapping[TP, int], await consumer.seek_to_committed())
        changelogs = self.app.tables.changelog_topics
        fresh: list[TP] = []
        for tp, offset in committed.items():
            if tp.topic in changelogs:
                continue
            if offset == 0:
                consumer.seek(tp, 0)
            elif offset is None:
                fresh.append(tp)
        if fresh:
            if self.app.conf.consumer_auto_offset_reset == "latest":
                await consumer.seek_to_end(*fresh)
            else:
                await consumer.seek_to_beginning(*fresh)
        return committed


def _read_to_end(consumer: Any, tp: TP) -> bool:
    """Has ``tp`` been handed over up to its last known high watermark? True when it is
    not assigned here: nothing of it will come."""
    assignment = getattr(consumer._subscription.subscription, "assignment", None)
    state = assignment.state_value(tp) if assignment is not None else None
    if state is None:
        return True
    return bool(state.has_valid_position and state.highwater is not None
                and state.position >= state.highwater)


class BatchConsumer(kafka_driver.Consumer):
    """Faust's aiokafka consumer, handing each fetch of some topics to one batch handler.

    Faust delivers messages one at a time: for every message its fetch loop races the
    delivery against the flow-control event (``wait_first``: four asyncio tasks), and
    the stream, the conductor and the acks add more; a worker whose agent does nothing
    tops out near 15,000 events/s here (``python -m streams bench``, "Faust floor"). The
    join needs none of it: its state, write-ahead entry and offsets make a batch the unit
    of crash safety. So the records of :attr:`App.batch_topics` skip the stream: one call
    of the handler per fetch with aiokafka's records as they came (no Faust message per
    record), then the bookkeeping Faust's ``ack`` does per message, for the whole batch
    at once (:meth:`_ack_all`), so commits, rebalances and recovery work as before.
    Records of every other topic take Faust's usual path.

    The handler runs as a task, one batch at a time: while a batch waits for its writes'
    acknowledgements, the fetch loop takes the next fetch from the consumer thread and
    hands the stream topics' records (the model stage's) over, and the next batch starts
    once the one before has returned and been acknowledged. Waiting for the hand-over
    after each batch had left the worker's main thread with nothing to do for a tenth of
    a run (100 batches of 3,000: 1.05 s between batches, 0.67 s of it waiting for the
    consumer thread, against 7.5 s in the handler).

    A rebalance waits for the batch in flight before it commits and revokes (as Faust's
    ``Consumer.wait_empty`` waits for unacknowledged stream events); a batch is never cut
    short by flow control as a Faust stream's buffered events are. A fetch taken while a
    batch was in flight is dropped when a rebalance or a seek began meanwhile, as Faust
    drops its fetched records then. A handler's error is logged when it happens, and
    raised in the fetch loop (which stops the worker) at its next call; a stop that
    cancelled the fetch loop meanwhile makes no next call, and the batch, never
    acknowledged, is read again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set while no batch is in flight: cleared by getmany as it starts one, set again
        # by _batch_done as it ends.
        self._batch_idle = asyncio.Event()
        self._batch_idle.set()
        self._in_flight: asyncio.Task[None] | None = None
        # Counted as each seek (any partition) begins and again as it ends: a fetch is
        # handed over only if the count has not moved since it was asked for.
        self._seeks = 0
        self._reseek = False  # set by a batch dropped so; the fetch loop then seeks

    def _new_consumer_thread(self) -> kafka_driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        app = cast(App, self.app)
        if app.batch_handler is None:
            async for item in super().getmany(timeout):
                yield item
            return
        if self._in_flight is not None and self._in_flight.done():
            await self._finish_in_flight()  # raises the handler's error, if any
        seeks = self._seeks
        records, active = await self._wait_next_records(timeout)
        generation = app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:  # what Faust does: read again from the committed offsets
            try:
                await self.perform_seek()
            except Exception as exc:
                self.log.warning("exception performing seek when flow not active %r", exc)
            return
        by_topic: dict[str, list[tuple[TP, list[Any]]]] = {t: [] for t in app.batch_topics}
        rest: dict[TP, Any] = {}
        for tp, tp_records in records.items():
            if not (active is None or tp in active or tp in self._buffered_partitions):
                continue
            if tp.topic in by_topic:
                by_topic[tp.topic].append((tp, tp_records))
            else:
                rest[tp] = tp_records
        # Stream topics first (Faust's own path, as in its getmany): the model stage then
        # works through its records while the join's batch waits for its writes.
        to_message = self._to_message
        for tp, record in self.scheduler.iterate(rest):
            if not self.flow_active or app.consumer_generation_id != generation:
                return
            yield tp, to_message(tp, record)
        batch = [group for groups in by_topic.values() for group in groups]
        if not batch:
            return
        await self._finish_in_flight()
        if self._seeks != seeks or self._reseek:
            # A seek began or ended after this fetch was asked for, so its records may be
            # from before it: handed over, the records read again from the seek's offset
            # would look read before it, never be acknowledged and hold the commit. Or
            # the batch before was dropped so (_deliver). Read again from the committed
            # offsets, as Faust does after dropping a fetch.
            self.log.info("a fetch taken before a seek ended was dropped; reading again "
                          "from the committed offsets")
            await self.perform_seek()
            return
        if self.flow_active and app.consumer_generation_id == generation:
            self._batch_idle.clear()  # from now: a rebalance waits for this batch
            task = asyncio.ensure_future(self._deliver(app.batch_handler, batch, seeks))
            task.add_done_callback(self._batch_done)
            self._in_flight = task

    async def perform_seek(self) -> None:
        self._seeks += 1
        self._reseek = False  # whoever asked for it: this is the seek back
        try:
            await super().perform_seek()
        finally:
            self._seeks += 1

    async def seek(self, partition: TP, offset: int) -> None:
        self._seeks += 1
        try:
            await super().seek(partition, offset)
        finally:
            self._seeks += 1

    def _new_offset(self, tp: TP) -> int | None:
        """Faust's, with each acknowledged offset counted once.

        Faust adds a partition's gaps to its acknowledged offsets before it looks for
        the run to commit, and a gap can cover offsets acknowledged already. Faust's run
        search then stops at the first offset that appears twice, and commits move one
        or two offsets at a time (robinhood/faust#625). In a rerun of a test that
        failed CI, a join 6,140 offsets behind on labels[2] moved 36 in 300 s. Here the
        gaps are added first, once, and the offsets made unique; Faust's method then
        finds no gap below the highest offset left to add.
        """
        acked, gaps = self._acked[tp], self._gap[tp]
        if acked and gaps:  # only gaps add an offset twice: the acks keep an index
            top = max(acked)
            spans = gaps.overlap(0, top)
            if spans:
                covered = [o for span in spans for o in range(span.begin, span.end)]
                gaps.chop(0, max(max(covered), top + 1))
                acked[:] = sorted(set(acked).union(covered))
        return super()._new_offset(tp)

    def partition_count(self, topic: str) -> int | None:
        """The partitions of ``topic`` in the consumer's cluster metadata; None while it
        has none (before the consumer starts, or for a topic it never fetched).

        Faust's ``topic_partitions`` reads aiokafka's group-coordinator snapshot, which
        only the group's leader keeps: on every other member it is empty. A worker that
        took the producer's key hash over a count guessed from its own partitions
        exported a quiet model on no worker (a CI run under repeated kill -9: owning
        records partitions 0, 2, 4 and 6 of 8, it hashed over 7 and missed m3's).
        """
        # aiokafka's consumer (None before start); Faust keeps no public view of it.
        consumer = cast(kafka_driver.AIOKafkaConsumerThread, self._thread)._consumer
        partitions = consumer.partitions_for_topic(topic) if consumer is not None else None
        return len(partitions) if partitions else None

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        # However the task ended (even cancelled before it began), nothing is in flight.
        self._batch_idle.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("a join batch failed (its records were not acknowledged and "
                           "are read again): %r", exc)

    async def _finish_in_flight(self) -> None:
        """Wait for the batch in flight, if any; raise its error. Shielded: a fetch loop
        cancelled meanwhile (a stop) leaves the batch to finish, which ``wait_empty``
        then waits for."""
        task = self._in_flight
        if task is not None:
            await asyncio.shield(task)
            self._in_flight = None

    async def _deliver(self, handler: BatchHandler, batch: list[tuple[TP, list[Any]]],
                       seeks: int) -> None:
        if self._seeks != seeks:
            # A seek began or ended after this fetch was asked for (one asked for while a
            # seek was under way can hold records from before it, handed over after it).
            # Taken as they were, the records made a gap over offsets acknowledged
            # already (a commit held back for 300 s, see _new_offset). The fetch loop
            # reads again from the committed offsets: seeking here, inside the batch a
            # rebalance waits for, could wait on that rebalance.
            self._reseek = True
            return
        read = self._read_offset
        fresh: list[tuple[TP, list[Any]]] = []
        for tp, records in batch:
            kept = []
            for record in records:
                last, offset = read[tp], record.offset
                if last is not None and offset < last:
                    continue  # read before a seek back; Faust drops these too
                if last and offset - last > 1:
                    # Offsets the broker never hands out (transaction markers, compaction):
                    # as Faust does, let commits pass them.
                    await self._add_gap(tp, last + 1, offset)
                read[tp] = offset
                kept.append(record)
            if kept:
                fresh.append((tp, kept))
        if not fresh:
            return
        await handler(fresh)
        self._ack_all(fresh)
        # What a Faust stream's sensor records per event; without it Faust's livelock
        # check logs "Stream has not started processing" for every input partition.
        monitor = self.app.monitor
        if monitor is not None:
            now = monotonic()
            for tp, _ in fresh:
                monitor.stream_inbound_time[tp] = now

    def _ack_all(self, batch: list[tuple[TP, list[Any]]]) -> None:
        """What Faust's ``Consumer.ack`` records per message, for a batch's records: the
        offsets its commits advance over (``_acked``, ``_acked_index``, ``_n_acked``).
        One Faust message and one ``ack`` call per record cost a busy worker ~5% of its
        main thread (py-spy); there is no message here to mark acknowledged."""
        enabled = self.app.topics.acks_enabled_for
        with ack_lock:
            for tp, records in batch:
                if not enabled(tp.topic):
                    continue
                committed = self._committed_offset[tp]
                index = self._acked_index[tp]
                offsets = [record.offset for record in records]  # increasing
                if (committed is None or offsets[0] >= committed) and index.isdisjoint(offsets):
                    fresh = offsets  # the usual case: all new
                else:  # offsets increase, so none repeats within the batch
                    fresh = [offset for offset in offsets if offset not in index
                             and (committed is None or offset >= committed)]
                index.update(fresh)
                self._acked[tp].extend(fresh)
                self._n_acked += len(fresh)
            notify(self._waiting_for_ack)

    async def wait_empty(self) -> None:
        """A rebalance or a stop first lets the batch in flight finish and be acknowledged."""
        await self._batch_idle.wait()
        await super().wait_empty()


class App(faust.App):
    """Faust's app with one batch route: :class:`BatchConsumer` hands every fetch of
    ``batch_topics`` to ``batch_handler`` (set by :meth:`route_batches`), the records of
    the first topic first."""

    batch_topics: tuple[str, ...] = ()
    batch_handler: BatchHandler | None = None
    #: Bytes a fetch waits for (at most FETCH_WAIT_MS), ``Settings.fetch_min_bytes``. The
    #: broker answers a fetch as soon as it has this much: with Kafka's 1 byte, a worker
    #: fed at a steady rate took a fetch, a join batch and its four rounds of writes per
    #: ~400 events at 16,000 events/s, and spent 34 us of main thread per event (53 at
    #: 8,000/s) against 24 over a backlog; with 256 KiB, 30 and 34 us (README, Performance).
    fetch_min_bytes: int = 1

    def route_batches(self, topics: Sequence[str], handler: BatchHandler) -> None:
        self.batch_topics = tuple(topics)
        self.batch_handler = handler

    def _new_transport(self) -> TransportT:
        transport = super()._new_transport()
        transport.Consumer = BatchConsumer  # type: ignore[misc]
        return transport


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


#: The zstd level the worker's producer compresses at. aiokafka always uses 3 (Kafka's
#: default) and has no setting for it; on the worker's batches level 1 took half the
#: time and came out smaller (README, Performance).
ZSTD_LEVEL = 1


def use_zstd_level(level: int) -> None:
    """Have aiokafka's record batch builders (the compiled one and the pure-Python one)
    compress zstd at ``level``: they call the ``zstd_encode`` of their own module."""
    from aiokafka import codec
    from aiokafka.record import default_records

    modules: list[Any] = [default_records]
    try:
        from aiokafka.record._crecords import default_records as compiled
    except ImportError:  # aiokafka without its compiled extensions
        pass
    else:
        modules.append(compiled)
    encode = functools.partial(codec.zstd_encode, level=level)
    for module in modules:
        if not hasattr(module, "zstd_encode"):
            raise RuntimeError(f"{module.__name__} has no zstd_encode to set the level of "
                               "(aiokafka changed): see streams.app.use_zstd_level")
        module.zstd_encode = encode


def create_app(settings: Settings, partitions: int) -> App:
    """Faust app with driftwarden's defaults: loopback web server, no standby replicas."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.compression == "zstd":
        use_zstd_level(ZSTD_LEVEL)
    app = App(
        # The app id is the consumer group: the prefix isolates deployments (and test
        # runs) sharing a cluster, and each role has a group of its own. The tables name
        # their changelogs themselves (streams.tables), the same for every role.
        settings.group,
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
        # Faust refuses a session timeout above its request timeout (90 s by default);
        # a longer session (README: up to the broker's 1800 s) lengthens that to match.
        broker_request_timeout=max(90.0, settings.session_timeout_seconds + 10.0),
        producer_acks=-1,
        # What the worker writes goes compressed (records, changelogs, write-ahead
        # entries): a quarter of the bytes for the broker to take and acknowledge (with
        # zstd, 8% faster against a loaded broker, as fast against a fresh one: README,
        # Performance). streams.topics keeps the topics users read plain.
        producer_compression_type=None if settings.compression == "none" else settings.compression,
        producer_max_request_size=4 * 1024 * 1024,
        # Per partition and fetch. One model's records all go to one partition of the
        # records topic, carrying every prediction's event: with 128 KiB the model stage
        # got one message per fetch and starved (see _ConsumerThread too).
        consumer_max_fetch_size=settings.fetch_bytes,
        broker_max_poll_records=settings.batch_size,
        stream_buffer_maxsize=max(4096, 4 * settings.batch_size),
        key_serializer="raw",
        value_serializer="raw",
        Worker=Worker,
        # Its recovery reads the changelogs (streams.tables), not the assignment callback.
        TableManager=TableManager,
    )
    app.fetch_min_bytes = settings.fetch_min_bytes
    return app
