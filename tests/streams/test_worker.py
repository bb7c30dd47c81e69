"""The worker on the real broker: start-up checks and consuming events."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from tests.streams.harness import (
    ROOT,
    create_topics,
    labelled,
    produce,
    read_topic,
    report,
    run,
    wait_until,
)


def test_worker_consumes_a_prediction(start_worker, kafka_broker, prefix):
    # A session timeout above Faust's 90 s request timeout, which Faust alone refuses.
    worker = start_worker(DRIFTWARDEN_SESSION_TIMEOUT_SECONDS="120")
    event = {"id": "p-1", "model": "fraud", "version": "3", "features": {"amount": 12.5},
             "prediction": 1, "scores": {"0": 0.25, "1": 0.75}}
    run(produce(kafka_broker, [(prefix + "predictions", b"p-1", orjson.dumps(event))]))

    wait_until(lambda: worker.value("driftwarden_predictions_total", model="fraud", version="3"),
               60, "driftwarden_predictions_total to count the prediction")
    assert worker.value("driftwarden_predictions_total", model="fraud", version="3") == 1.0
    assert worker.value("driftwarden_pending_labels") == 1.0


def test_a_model_name_with_a_bar_keeps_its_labels(start_worker, kafka_broker, prefix):
    # The join counts a version under "model|version": the bar in a name must not move
    # where the model ends (it exported model="a", version="b|v|1" for the predictions).
    worker = start_worker()
    model, version = "a|b\\", "v|1"
    events = [{"id": f"bar-{i}", "model": model, "version": version, "features": {"x": 1.0},
               "prediction": 1} for i in range(2)]
    run(produce(kafka_broker, [
        *[(prefix + "predictions", e["id"].encode(), orjson.dumps(e)) for e in events],
        (prefix + "labels", b"bar-0", orjson.dumps({"id": "bar-0", "label": 1}))]))
    wait_until(lambda: worker.value("driftwarden_outcomes_total", model=model, version=version),
               60, "the outcome to be absorbed")
    series = {(name, labels) for (name, labels) in worker.metrics()
              if name in ("driftwarden_predictions_total", "driftwarden_outcomes_total")}
    assert series == {(name, (("model", model), ("version", version)))
                      for name in ("driftwarden_predictions_total", "driftwarden_outcomes_total")}
    assert worker.value("driftwarden_predictions_total", model=model, version=version) == 2
    assert worker.value("driftwarden_outcomes_total", model=model, version=version) == 1
    assert worker.value("driftwarden_pending_labels") == 1


def test_worker_refuses_to_start_when_join_topics_differ(kafka_broker, prefix):
    run(create_topics(kafka_broker, {prefix + "predictions": 4, prefix + "labels": 8}))
    env = {"DRIFTWARDEN_BROKER": f"kafka://{kafka_broker}", "DRIFTWARDEN_TOPIC_PREFIX": prefix,
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "streams", "worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert (f"topic '{prefix}predictions' has 4 partitions but '{prefix}labels' has 8"
            in done.stderr)


def test_a_topic_the_broker_refuses_to_create_stops_the_worker_naming_the_variable(
        kafka_broker, prefix):
    # One broker cannot hold three replicas: the broker refuses, and says why.
    env = {"DRIFTWARDEN_BROKER": f"kafka://{kafka_broker}", "DRIFTWARDEN_TOPIC_PREFIX": prefix,
           "DRIFTWARDEN_REPLICATION_FACTOR": "3", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "streams", "worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert (f"driftwarden: the broker at DRIFTWARDEN_BROKER='kafka://{kafka_broker}' refused "
            f"to create topic '{prefix}predictions': InvalidReplicationFactorError: "
            in done.stderr), done.stderr[-2000:]
    assert "only 1 broker(s) are registered" in done.stderr
    assert done.stderr.rstrip().endswith("; check DRIFTWARDEN_REPLICATION_FACTOR=3")
    assert "Traceback" not in done.stderr


def test_a_busy_metrics_port_stops_the_worker_before_kafka_is_touched(kafka_broker, prefix):
    import socket

    from aiokafka.admin import AIOKafkaAdminClient

    async def topics() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker)
        await admin.start()
        try:
            return [t for t in await admin.list_topics() if t.startswith(prefix)]
        finally:
            await admin.close()

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"DRIFTWARDEN_BROKER": f"kafka://{kafka_broker}",
               "DRIFTWARDEN_TOPIC_PREFIX": prefix, "DRIFTWARDEN_METRICS_PORT": str(port),
               "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-m", "streams", "worker"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == ("driftwarden: cannot serve metrics on DRIFTWARDEN_METRICS_HOST:"
                           f"DRIFTWARDEN_METRICS_PORT=127.0.0.1:{port}: Address already in use\n")
    assert run(topics()) == []  # no topic created, no group joined


def test_worker_names_the_bad_variable(kafka_broker):
    env = {"DRIFTWARDEN_METRICS_PORT": "nine", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "streams", "worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "DRIFTWARDEN_METRICS_PORT must be an integer, got 'nine'" in done.stderr


def test_a_rebalance_moves_series_to_the_new_owner_without_duplicates(start_worker,
                                                                      kafka_broker, prefix):
    models = [f"m{k}" for k in range(10)]
    records = []
    for k, model in enumerate(models):
        records += labelled(prefix, range(200), model, label=lambda i, k=k: (i + k) % 2)
    first = start_worker()
    run(produce(kafka_broker, records))
    wait_until(lambda: first.total("driftwarden_outcomes_total") == 2000, 60,
               "2,000 outcomes on the first worker")

    second = start_worker()  # same consumer group: the partitions are shared out

    def owners() -> dict[str, list[str]] | None:
        seen: dict[str, list[str]] = {m: [] for m in models}
        for name, worker in (("first", first), ("second", second)):
            for model in worker.by_label("driftwarden_outcomes_total", "model"):
                seen[model].append(name)
        predictions = sum(w.total("driftwarden_predictions_total") for w in (first, second))
        owned_once = all(len(v) == 1 for v in seen.values())
        both = {n for v in seen.values() for n in v} == {"first", "second"}
        return seen if owned_once and both and predictions == 2000 else None

    seen = wait_until(owners, 90, "each model exported by exactly one of the two workers")
    total = sum(w.total("driftwarden_outcomes_total") for w in (first, second))
    assert total == 2000, seen


def test_after_a_rebalance_a_follower_exports_the_quiet_models_of_its_records_partitions(
        prefix, tmp_path):
    # No new record reaches a quiet model after a rebalance, so its new owner exports it
    # from the recovered table, picking the models whose records partition (the
    # producer's key hash over the topic's partitions) it owns. On a group member that is
    # not the leader, aiokafka's coordinator snapshot (Faust's topic_partitions) is
    # empty; hashing over a count guessed from the worker's own partitions exported m3 on
    # no worker in a CI run (records partitions 0, 2, 4, 6 of 8 owned: hashed over 7).
    from types import SimpleNamespace

    from aiokafka.partitioner import DefaultPartitioner
    from aiokafka.structs import TopicPartition

    from models import codec
    from models.monitor import ModelState
    from streams.agents import Pipeline
    from streams.app import create_app
    from streams.metrics import Snapshot
    from streams.settings import Settings
    from streams.tables import declare_tables

    async def main() -> None:  # the consumer is made inside the loop, which run() closes
        settings = Settings(topic_prefix=prefix, data_dir=tmp_path)
        app = create_app(settings, 8)
        pipeline = Pipeline(app, settings, declare_tables(app, 8, settings),
                            Snapshot(max_models=10))
        records = prefix + "driftwarden-model-records"
        owned = {0, 2, 4, 6}
        app.consumer._thread._consumer = SimpleNamespace(  # aiokafka's consumer on a follower
            assignment=lambda: {TopicPartition(records, p) for p in owned},
            partitions_for_topic=lambda topic: set(range(8)) if topic == records else None,
            _coordinator=SimpleNamespace(_metadata_snapshot={}))
        models = [f"m{k}" for k in range(8)]
        for model in models:
            pipeline.models_table.data[model] = codec.dumps(ModelState(model, pipeline.policies))
        every = list(range(8))
        ours = {m for m in models if DefaultPartitioner()(m.encode(), every, every) in owned}
        assert ours == {"m1", "m3", "m4", "m7"}

        pipeline._recovered = pipeline._stale_snapshot = True  # what the end of recovery sets
        pipeline.rebuild_snapshot()
        assert set(pipeline.snapshot.models) == ours
        assert not pipeline._stale_snapshot

        # Before the consumer knows the topic, nothing is guessed: the next tick tries again.
        pipeline.snapshot.forget(set(), set(models))
        app.consumer._thread._consumer.partitions_for_topic = lambda topic: None
        pipeline._stale_snapshot = True
        pipeline.rebuild_snapshot()
        assert pipeline.snapshot.models == {} and pipeline._stale_snapshot
        app.consumer._thread.thread_loop.close()  # made for a thread never started

    run(main())


def test_state_survives_kill_9_exactly(start_worker, kafka_broker, prefix):
    def batch(start: int, stop: int) -> list[tuple[str, bytes, bytes]]:
        return labelled(prefix, range(start, stop), label=lambda i: 0 if i % 5 == 0 else i % 2)

    first = start_worker()
    run(produce(kafka_broker, batch(0, 3000)))
    wait_until(lambda: first.value("driftwarden_outcomes_total", model="fraud", version="0")
               == 3000, 60, "3,000 outcomes")
    first.proc.kill()  # SIGKILL: no commit, no flush; the next worker replays
    first.proc.wait(timeout=30)

    second = start_worker()
    run(produce(kafka_broker, batch(3000, 5000)))
    mv = {"model": "fraud", "version": "0"}
    try:
        wait_until(lambda: second.value("driftwarden_outcomes_total", **mv) == 5000, 90,
                   "5,000 outcomes on the restarted worker")
    except AssertionError as exc:
        seen = {k: v for k, v in second.metrics().items()
                if k[0] in ("driftwarden_outcomes_total", "driftwarden_predictions_total",
                            "driftwarden_events_received_total",
                            "driftwarden_events_consumed_total", "driftwarden_consumer_lag")}
        raise AssertionError(f"{exc}; it exports {seen}; {report([second])}") from None
    assert second.value("driftwarden_predictions_total", **mv) == 5000
    assert second.value("driftwarden_pending_labels") == 0
    # Every fifth odd prediction is wrong: 500 of 5,000.
    assert second.value("driftwarden_accuracy", window="cumulative", **mv) == 0.9


def _four_thousand(prefix: str) -> tuple[list[tuple[str, bytes, bytes]],
                                         list[tuple[str, bytes, bytes]]]:
    """4,000 predictions of model fraud and their labels; every fifth odd one wrong."""
    records = labelled(prefix, range(4000), label=lambda i: 0 if i % 5 == 0 else i % 2)
    return records[0::2], records[1::2]


def _all_joined(worker: Any) -> None:
    """Every one of the 4,000 met its label on ``worker``: exact counts, 90% accuracy."""
    mv = {"model": "fraud", "version": "0"}
    wait_until(lambda: worker.value("driftwarden_outcomes_total", **mv) == 4000, 60,
               "4,000 outcomes: each pending prediction met its label")
    assert worker.value("driftwarden_pending_labels") == 0
    assert worker.value("driftwarden_predictions_total", **mv) == 4000
    assert worker.value("driftwarden_accuracy", window="cumulative", **mv) == 0.9
    assert worker.total("driftwarden_dead_letters_total") == 0


def test_a_restarted_worker_reads_its_changelogs_itself_and_goes_on_from_them(
        start_worker, kafka_broker, prefix):
    """Faust's recovery applies a changelog at ~6,600 records/s; the worker reads the
    partitions newly assigned to it itself, before that recovery, which then has nothing
    left to read. The state it goes on from is the first worker's, exactly."""
    mv = {"model": "fraud", "version": "0"}
    first = start_worker()
    predictions, labels = _four_thousand(prefix)
    # Every prediction, and the labels of the first half: 2,000 wait for theirs.
    run(produce(kafka_broker, predictions + labels[:2000]))
    wait_until(lambda: first.value("driftwarden_outcomes_total", **mv) == 2000, 60,
               "2,000 outcomes")
    first.stop()
    changelog = run(read_topic(kafka_broker, prefix + "driftwarden-join-changelog", idle=1.0))

    second = start_worker()
    assert (f"{prefix}driftwarden-join-changelog: read {len(changelog)} changelog records "
            "of 8 partitions (8 newly assigned)" in second.log_text())
    assert "Still fetching changelog topics" not in second.log_text()
    wait_until(lambda: second.value("driftwarden_pending_labels") == 2000, 30,
               "the 2,000 pending predictions exported")
    run(produce(kafka_broker, labels[2000:]))
    _all_joined(second)


def _databases(data_dir: Any, table: str) -> dict[int, dict[bytes, bytes]]:
    """What the RocksDB databases of ``table`` under ``data_dir`` hold, by partition, but
    the time each last held its changelog's state (checked: within the last minute)."""
    import rocksdict

    out = {}
    for path in sorted(data_dir.glob(f"v1/tables/{table}-*.db")):
        db = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True),
                             access_type=rocksdict.AccessType.read_only())
        state = dict(db.items())
        db.close()
        synced = float(state.pop(b"__driftwarden\x00synced__"))
        assert time.time() - 60 < synced <= time.time(), (path, synced)
        out[int(path.stem.rsplit("-", 1)[1])] = state
    return out


def _compacted(records: list[Any]) -> dict[int, dict[bytes, bytes]]:
    """A changelog's state by partition (each key's last value, tombstones deleting), with
    the offset of its last record under Faust's offset key."""
    out: dict[int, dict[bytes, bytes]] = {}
    for rec in records:
        state = out.setdefault(rec.partition, {})
        if rec.value is None:
            state.pop(rec.key, None)
        else:
            state[rec.key] = rec.value
        state[b"__faust\x00offset__"] = str(rec.offset).encode()
    return out


def test_under_rocksdb_a_killed_worker_leaves_its_changelogs_state_on_disk_and_goes_on(
        start_worker, kafka_broker, prefix, tmp_path):
    """``DRIFTWARDEN_STORE=rocksdb://``: the tables live on disk, a database per
    partition. After a kill -9 each database holds exactly its changelog's state and the
    offset it reached, so the restarted worker reads nothing back and goes on exactly."""
    env = {"DRIFTWARDEN_STORE": "rocksdb://", "DRIFTWARDEN_DATA_DIR": str(tmp_path / "rocks")}
    mv = {"model": "fraud", "version": "0"}
    first = start_worker(**env)
    predictions, labels = _four_thousand(prefix)
    run(produce(kafka_broker, predictions + labels[:2000]))
    wait_until(lambda: first.value("driftwarden_outcomes_total", **mv) == 2000
               and first.value("driftwarden_pending_labels") == 2000, 60,
               "2,000 outcomes, 2,000 predictions pending")
    assert first.proc is not None
    first.proc.kill()  # SIGKILL
    first.proc.wait(timeout=30)
    for table in ("join", "models"):
        changelog = run(read_topic(kafka_broker, f"{prefix}driftwarden-{table}-changelog",
                                   idle=1.0))
        # A database of an empty changelog partition holds that it read to offset -1.
        held = {p: state for p, state in _databases(tmp_path / "rocks", table).items()
                if state != {b"__faust\x00offset__": b"-1"}}
        assert held == _compacted(changelog), table
    assert len(held) == 1  # the models table: model fraud's partition

    second = start_worker(**env)
    wait_until(lambda: second.value("driftwarden_pending_labels") == 2000, 30,
               "the 2,000 pending predictions exported")
    assert "Still fetching changelog topics" not in second.log_text()
    run(produce(kafka_broker, labels[2000:]))
    _all_joined(second)


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_partitions_that_come_back_are_read_again_with_what_their_other_owner_wrote(
        start_worker, kafka_broker, prefix, store):
    """The join's partitions, read at start-up, move to a second worker, which stores
    predictions there, and come back when it stops: under memory:// the first reads them
    from the changelog's start, not from where its reading ended before (Faust dropped
    what it held of them when they left); under rocksdb:// (a data directory per worker)
    on from the offset its databases kept. Either way every prediction meets its label
    there."""
    predictions, labels = _four_thousand(prefix)
    before = start_worker(DRIFTWARDEN_STORE=store)
    run(produce(kafka_broker, predictions[:2000]))
    wait_until(lambda: before.value("driftwarden_pending_labels") == 2000, 60,
               "2,000 pending predictions")
    before.stop()
    first = start_worker(DRIFTWARDEN_STORE=store)  # reads every partition's changelog
    wait_until(lambda: first.value("driftwarden_pending_labels") == 2000, 60,
               "2,000 pending predictions on the first worker")
    second = start_worker(DRIFTWARDEN_STORE=store)

    def shared() -> bool:
        pending = [w.value("driftwarden_pending_labels") for w in (first, second)]
        return sum(pending) == 2000 and min(pending) > 0

    wait_until(shared, 90, "the join's partitions shared out between the two workers")
    run(produce(kafka_broker, predictions[2000:]))
    wait_until(lambda: sum(w.value("driftwarden_pending_labels") for w in (first, second))
               == 4000, 60, "4,000 pending predictions on the two workers")
    second.stop()
    wait_until(lambda: first.value("driftwarden_pending_labels") == 4000, 90,
               "the first worker to hold all 4,000 pending predictions again")
    run(produce(kafka_broker, labels))
    _all_joined(first)
    assert "newly assigned" in first.log_text() and "Traceback" not in first.log_text()


def test_faust_web_server_is_local_and_serves_no_table_pages(start_worker):
    worker = start_worker()
    base = f"http://127.0.0.1:{worker.web_port}"
    for page in ("/table/join/", "/table/models/", "/router/", "/graph/"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + page, timeout=5)
        info.value.close()  # the error holds the response and its socket
        assert info.value.code == 404, page
    assert "127.0.0.1" in worker.log_text().split("web", 1)[1].splitlines()[0]


def test_default_log_level_does_not_build_debug_records():
    # Faust's spinner set the root logger to DEBUG at WARN, so every aiokafka debug line
    # (one per message produced) built a LogRecord nobody printed: ~5% of the worker.
    import logging

    from streams.app import create_app
    from streams.settings import Settings

    app = create_app(Settings.from_env(), 8)
    worker = app.conf.Worker(app, loglevel="warn")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        worker._setup_logging()
        assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
        assert root.level == logging.WARNING
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def test_the_producer_refreshes_metadata_of_its_own_topics_only(kafka_broker, prefix, tmp_path):
    # aiokafka's producer bootstraps with the whole cluster's metadata and, never adding
    # a topic it already knows, would refresh all of it every five minutes: on a shared
    # cluster of thousands of partitions that is memory and broker load per worker.
    from streams.agents import Pipeline
    from streams.app import create_app
    from streams.metrics import Snapshot
    from streams.settings import Settings
    from streams.tables import declare_tables
    from streams.topics import ensure_topics

    settings = Settings(broker=f"kafka://{kafka_broker}", topic_prefix=prefix,
                        data_dir=tmp_path)
    run(create_topics(kafka_broker, {prefix + "someone-elses": 3}))
    partitions = run(ensure_topics(settings))
    app = create_app(settings, partitions)
    pipeline = Pipeline(app, settings, declare_tables(app, partitions, settings),
                        Snapshot(max_models=10))

    async def known_topics() -> tuple[set[str], set[str]]:
        await app.producer.start()
        try:
            client = app.producer._producer.client
            # What Faust's topic declaration does at start-up (faust-streaming #499): with
            # no topics of its own yet, the producer's client fetches the whole cluster.
            for _ in range(60):  # until the broker serves the topic made just before
                await client.force_metadata_update()
                if prefix + "someone-elses" in client.cluster.topics():
                    break
                await asyncio.sleep(0.5)
            before = set(client.cluster.topics())
            await pipeline.track_producer_topics()
            assert pipeline.track_producer_topics() is None  # until the topics change
            return before, set(client.cluster.topics())
        finally:
            await app.producer.stop()

    before, after = run(known_topics())
    assert {prefix + "someone-elses", prefix + "predictions"} <= before
    # The changelog topics are made when the worker starts; here they do not exist yet.
    assert after == {prefix + "retraining", prefix + "dead-letters",
                     prefix + "driftwarden-model-records"}
    assert set(pipeline.producer_topics()) == after | {
        prefix + "driftwarden-join-changelog", prefix + "driftwarden-models-changelog"}


def test_a_topic_first_written_after_start_up_strands_no_batch_of_another(kafka_broker, prefix):
    # A changelog Faust creates at start-up is unknown to the producer's bootstrap
    # metadata; aiokafka's first send to it made it the only topic the producer tracked,
    # and a batch for the records topic, accepted before, lost its leader for good: the
    # worker hung (6 of 7 fed 100,000 predictions on a freshly reset broker). Tracking
    # every topic the worker writes before it writes keeps both. The linger holds the
    # first batch in the producer while the second send refreshes the metadata.
    from aiokafka import AIOKafkaProducer

    from streams.tables import track_topics

    old, new = prefix + "records", prefix + "changelog"
    run(create_topics(kafka_broker, {old: 1}))

    async def scenario() -> list[int]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker, linger_ms=500)
        await producer.start()
        try:
            client = producer.client
            for _ in range(60):  # the records topic in the whole-cluster metadata, as at
                await client.force_metadata_update()  # a worker's start-up
                if old in client.cluster.topics():
                    break
                await asyncio.sleep(0.5)
            assert not client._topics  # nothing tracked yet: aiokafka fetches everything
            await create_topics(kafka_broker, {new: 1})
            update = track_topics(producer, [old, new])
            assert update is not None
            await update
            assert track_topics(producer, [old, new]) is None
            first = await producer.send(old, b"record")
            second = await producer.send(new, b"entry")
            acks = await asyncio.wait_for(asyncio.gather(first, second), timeout=20)
            return [ack.offset for ack in acks]
        finally:
            await producer.stop()

    assert run(scenario()) == [0, 0]


def test_each_topic_is_created_with_its_storage_settings(kafka_broker, prefix, tmp_path):
    # One model's records share a partition and carry every prediction's event: a fetch
    # of them (DRIFTWARDEN_FETCH_BYTES) was the model stage's ceiling until the broker
    # stored them zstd-compressed. Topics the users write keep what their producers chose;
    # those they read are stored plain, whatever the worker's producer compresses with.
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from streams.settings import Settings
    from streams.topics import TopicNames, ensure_topics

    settings = Settings(broker=f"kafka://{kafka_broker}", topic_prefix=prefix,
                        data_dir=tmp_path)
    run(ensure_topics(settings))
    names = TopicNames.from_settings(settings)

    async def compression() -> dict[str, str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker)
        await admin.start()
        try:
            topics = [names.model_records, names.predictions, names.labels, names.retraining,
                      names.dead_letters]
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
            return {name: dict(e[:2] for e in entries)["compression.type"]
                    for _, _, _, name, entries in response.resources}
        finally:
            await admin.close()

    assert run(compression()) == {names.model_records: "zstd", names.predictions: "producer",
                                  names.labels: "producer", names.retraining: "uncompressed",
                                  names.dead_letters: "uncompressed"}

    async def references() -> dict[str, str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker)
        await admin.start()
        try:
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, names.references)])
            [(_, _, _, _, entries)] = response.resources
            configs = dict(e[:2] for e in entries)
            return {k: configs[k] for k in ("cleanup.policy", "max.message.bytes")}
        finally:
            await admin.close()

    # A profile of many categorical features passes Kafka's default 1 MiB.
    assert run(references()) == {"cleanup.policy": "compact", "max.message.bytes": "4194304"}


def test_new_topics_are_served_when_ensure_topics_returns(kafka_broker, prefix, tmp_path):
    # The broker names a new partition's leader before that leader has created its log;
    # a produce in between is refused (NotLeaderForPartitionError) and, when the broker
    # was slow for longer than a request timeout, dropped (CI's bench waited 540 s).
    # Asked once, without retries, right after ensure_topics: every partition answers.
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.offset import OffsetRequest

    from streams.settings import Settings
    from streams.topics import TopicNames, ensure_topics

    settings = Settings(broker=f"kafka://{kafka_broker}", topic_prefix=prefix,
                        data_dir=tmp_path, partitions=8)
    names = TopicNames.from_settings(settings)

    async def errors_of_one_list_offsets() -> dict[tuple[str, int], int]:
        await ensure_topics(settings)
        client = AIOKafkaClient(bootstrap_servers=kafka_broker)
        await client.bootstrap()
        try:
            topics = [names.predictions, names.labels, names.retraining, names.references,
                      names.dead_letters, names.model_records]
            [node] = [b.nodeId for b in client.cluster.brokers()]
            response = await client.send(node, OffsetRequest(-1, 0, [
                (t, [(p, -1) for p in range(8)]) for t in topics]))
            return {(t, p[0]): p[1] for t, parts in response.topics for p in parts}
        finally:
            await client.close()

    errors = run(errors_of_one_list_offsets())
    assert len(errors) == 48 and set(errors.values()) == {0}, [tp for tp, e in errors.items() if e]


def test_the_join_takes_its_input_a_fetch_at_a_time(prefix, tmp_path):
    # Faust's stream hands events over one at a time at ~67 us each, more than the join
    # itself costs: the inputs must go to join_batch through the consumer's batch route.
    # (Commits after such batches: the kill -9 test waits for the group's lag to be 0.)
    from streams.agents import Pipeline
    from streams.app import BatchConsumer, create_app
    from streams.metrics import Snapshot
    from streams.settings import Settings
    from streams.tables import declare_tables

    settings = Settings(topic_prefix=prefix, data_dir=tmp_path)
    app = create_app(settings, 8)
    pipeline = Pipeline(app, settings, declare_tables(app, 8, settings), Snapshot(max_models=10))
    pipeline.register()

    async def consumer_type() -> type:  # made inside the loop, which run() closes
        return type(app.consumer)

    assert run(consumer_type()) is BatchConsumer
    assert app.batch_topics == (prefix + "predictions", prefix + "labels")
    assert app.batch_handler == pipeline.join_batch
    # The model stage keeps Faust's path: its input is one message per model per batch.
    assert prefix + "driftwarden-model-records" not in app.batch_topics


def test_a_fetch_reaches_the_join_once_in_order_and_marks_its_partitions_live(prefix, tmp_path):
    from aiokafka.structs import ConsumerRecord
    from faust.types import TP
    from faust.types.tuples import ConsumerMessage

    from streams.app import create_app
    from streams.settings import Settings

    app = create_app(Settings(topic_prefix=prefix, data_dir=tmp_path), 8)
    tp, other = TP(prefix + "predictions", 0), TP(prefix + "predictions", 1)

    def record(offset: int) -> ConsumerRecord:
        return ConsumerRecord(tp.topic, 0, offset, 1000, 0, b"k", b"v", None, 1, 1, ())

    handed: list[list[tuple[TP, list[int]]]] = []

    async def handler(batch: list[tuple[TP, list[ConsumerRecord]]]) -> None:
        handed.append([(p, [r.offset for r in records]) for p, records in batch])

    async def deliver() -> Any:
        consumer = app.consumer  # made inside the loop: Faust's services take the running one
        app.topics._acking_topics.add(tp.topic)  # as subscribing the topic does
        consumer._read_offset[tp] = 4  # the last offset read before this fetch
        seeks = consumer._seeks  # no seek since the fetches were asked for
        await consumer._deliver(handler, [(tp, [record(o) for o in (3, 5, 6, 9)])], seeks)
        await consumer._deliver(handler, [(tp, [record(6)])], seeks)  # read already: dropped
        # Offset 9 again (a seek back to it): handed again, acknowledged once only.
        await consumer._deliver(handler, [(tp, [record(9)])], seeks)
        assert consumer._batch_idle.is_set()  # no batch in flight: wait_empty returns
        # The batch's acknowledgement is the bookkeeping of Faust's ack() per message.
        for offset in (5, 6, 9):
            consumer.ack(ConsumerMessage(other.topic, 1, offset, 1.0, 0, [], b"k", b"v",
                                         None, 1, 1, other))
        return consumer

    consumer = run(deliver())
    consumer._thread.thread_loop.close()  # made for the consumer's thread, never started
    assert handed == [[(tp, [5, 6, 9])], [(tp, [9])]]
    assert consumer._acked[tp] == consumer._acked[other] == [5, 6, 9]
    assert consumer._acked_index[tp] == consumer._acked_index[other] == {5, 6, 9}
    assert consumer._n_acked == 6
    # 7 and 8 never came (transaction markers, compaction): commits may pass them, as
    # Faust's own fetch loop allows.
    assert sorted((i.begin, i.end) for i in consumer._gap[tp]) == [(7, 10)]
    # Faust's livelock check reads this; unset, it logs "Stream has not started
    # processing" for every input partition after stream_processing_timeout.
    assert tp in app.monitor.stream_inbound_time


def test_the_next_fetch_is_taken_while_a_batch_waits_for_its_writes(prefix, tmp_path,
                                                                    caplog):
    # The join's batch waits for four rounds of acknowledged writes; meanwhile the fetch
    # loop takes the next fetch (and hands the model stage its records). Batches still
    # run one at a time and in order, a rebalance waits for the one in flight, and a
    # batch's error reaches the fetch loop.
    from aiokafka.structs import ConsumerRecord
    from faust.types import TP

    from streams.app import create_app
    from streams.settings import Settings

    app = create_app(Settings(topic_prefix=prefix, data_dir=tmp_path), 8)
    tp = TP(prefix + "predictions", 0)
    fetched: list[list[int]] = []
    handled: list[tuple[str, list[int]]] = []
    gates = [asyncio.Event() for _ in range(3)]

    async def handler(batch: list[tuple[TP, list[ConsumerRecord]]]) -> None:
        offsets = [r.offset for _, records in batch for r in records]
        handled.append(("start", offsets))
        await gates[sum(kind == "start" for kind, _ in handled) - 1].wait()
        if offsets == [5]:
            raise RuntimeError("the third batch fails")
        handled.append(("end", offsets))

    async def scenario() -> Any:
        consumer = app.consumer  # made inside the loop: Faust's services take the running one
        app.route_batches((tp.topic,), handler)
        app.topics._acking_topics.add(tp.topic)
        consumer._read_offset[tp] = None
        fetches = iter([[0, 1, 2], [3, 4], [5]])

        async def next_records(timeout: float) -> Any:
            offsets = next(fetches)
            fetched.append(offsets)
            return {tp: [ConsumerRecord(tp.topic, 0, o, 1000, 0, b"k", b"v", None, 1, 1, ())
                         for o in offsets]}, None

        consumer._wait_next_records = next_records

        async def fetch_loop_step() -> None:  # one getmany call of Faust's fetch loop
            async def step() -> None:
                async for _ in consumer.getmany(1.0):
                    pass
            await asyncio.wait_for(step(), 5.0)  # a fetch loop held by its batch: fails

        await fetch_loop_step()  # hands the first fetch over and returns
        await asyncio.sleep(0.01)
        assert handled == [("start", [0, 1, 2])] and not consumer._batch_idle.is_set()
        step = asyncio.ensure_future(fetch_loop_step())
        await asyncio.sleep(0.01)
        # The second fetch is taken while the first batch is in flight, and waits for it.
        assert fetched == [[0, 1, 2], [3, 4]] and handled == [("start", [0, 1, 2])]
        assert consumer._acked[tp] == []  # acknowledged once its handler returns
        gates[0].set()
        await step
        await asyncio.sleep(0.01)
        assert handled == [("start", [0, 1, 2]), ("end", [0, 1, 2]), ("start", [3, 4])]
        assert consumer._acked[tp] == [0, 1, 2]
        # What wait_empty (a rebalance, a stop) waits for before Faust commits.
        rebalance = asyncio.ensure_future(consumer._batch_idle.wait())
        await asyncio.sleep(0.01)
        assert not rebalance.done()  # waits for the batch in flight
        gates[1].set()
        await asyncio.wait_for(rebalance, 5.0)
        assert consumer._acked[tp] == [0, 1, 2, 3, 4]
        gates[2].set()
        await fetch_loop_step()  # the third batch starts, and fails
        await asyncio.sleep(0.01)
        # Logged as it happens (a stop may leave no next call), raised at the next call.
        assert any("a join batch failed" in r.getMessage() and "the third batch fails"
                   in r.getMessage() for r in caplog.records)
        with pytest.raises(RuntimeError, match="the third batch fails"):
            await fetch_loop_step()
        assert len(fetched) == 3  # raised before fetching again
        assert consumer._acked[tp] == [0, 1, 2, 3, 4] and consumer._batch_idle.is_set()

        # A batch cancelled before it began leaves nothing for a rebalance to wait for.
        consumer._in_flight = None
        consumer._batch_idle.clear()
        never = asyncio.ensure_future(asyncio.sleep(3600))
        never.add_done_callback(consumer._batch_done)
        never.cancel()
        await asyncio.wait_for(consumer._batch_idle.wait(), 5.0)
        return consumer

    consumer = run(scenario())
    consumer._thread.thread_loop.close()  # made for the consumer's thread, never started


def test_a_fetch_taken_before_a_seek_is_dropped_and_read_again(prefix, tmp_path):
    # Table recovery seeks every partition back to its committed offset without a
    # rebalance. A fetch taken while a batch was in flight, and handed over after such a
    # seek, would put records from before it ahead of those read again from the committed
    # offset; those would look read already, never be acknowledged, and hold the commit
    # (a CI run: predictions[7] committed at 13,432 of 19,812 for 300 s).
    from aiokafka.structs import ConsumerRecord
    from faust.types import TP

    from streams.app import create_app
    from streams.settings import Settings

    app = create_app(Settings(topic_prefix=prefix, data_dir=tmp_path), 8)
    tp = TP(prefix + "predictions", 0)
    handled: list[list[int]] = []
    gate = asyncio.Event()
    seeks: list[int] = []

    async def handler(batch: list[tuple[TP, list[ConsumerRecord]]]) -> None:
        handled.append([r.offset for _, records in batch for r in records])
        await gate.wait()

    async def scenario() -> Any:
        consumer = app.consumer
        app.route_batches((tp.topic,), handler)
        app.topics._acking_topics.add(tp.topic)
        consumer._read_offset[tp] = None
        fetches = iter([[0, 1, 2], [3, 4], [0, 1, 2, 3, 4]])

        async def next_records(timeout: float) -> Any:
            return {tp: [ConsumerRecord(tp.topic, 0, o, 1000, 0, b"k", b"v", None, 1, 1, ())
                         for o in next(fetches)]}, None

        async def seek_to_committed() -> dict[TP, int]:  # the consumer thread's part
            seeks.append(len(handled))
            return {tp: 0}  # nothing committed yet

        consumer._wait_next_records = next_records
        consumer.seek_to_committed = seek_to_committed

        async def fetch_loop_step() -> None:
            async for _ in consumer.getmany(1.0):
                pass

        await asyncio.wait_for(fetch_loop_step(), 5.0)  # [0, 1, 2] goes to the handler
        step = asyncio.ensure_future(fetch_loop_step())  # takes [3, 4], waits for [0, 1, 2]
        await asyncio.sleep(0.01)
        await consumer.perform_seek()  # recovery, meanwhile
        gate.set()
        await asyncio.wait_for(step, 5.0)
        assert handled == [[0, 1, 2]] and seeks == [1, 1]  # [3, 4] dropped, read again
        assert consumer._read_offset[tp] == 0  # back to the committed offset
        await asyncio.wait_for(fetch_loop_step(), 5.0)
        await asyncio.wait_for(consumer._batch_idle.wait(), 5.0)
        assert handled == [[0, 1, 2], [0, 1, 2, 3, 4]]
        assert sorted(set(consumer._acked[tp])) == [0, 1, 2, 3, 4]  # the commit can pass
        return consumer

    consumer = run(scenario())
    consumer._thread.thread_loop.close()  # made for the consumer's thread, never started


def test_a_fetch_asked_for_while_a_seek_is_under_way_is_dropped_and_read_again(prefix,
                                                                               tmp_path):
    # The seek runs in the consumer's thread; a fetch asked for meanwhile can hold records
    # from the old position, and come back after the seek. Handed over, they made a gap
    # over the offsets acknowledged before the seek, and the commit crawled (a rerun of
    # a test that failed CI: labels[2] 6,140 offsets behind, 36 of them moved in 300 s).
    from aiokafka.structs import ConsumerRecord
    from faust.types import TP

    from streams.app import create_app
    from streams.settings import Settings

    app = create_app(Settings(topic_prefix=prefix, data_dir=tmp_path), 8)
    tp = TP(prefix + "labels", 0)
    handled: list[list[int]] = []
    seek_gate, fetch_gate = asyncio.Event(), asyncio.Event()

    async def handler(batch: list[tuple[TP, list[ConsumerRecord]]]) -> None:
        handled.append([r.offset for _, records in batch for r in records])

    def records(offsets: range) -> list[ConsumerRecord]:
        return [ConsumerRecord(tp.topic, 0, o, 1000, 0, b"k", b"v", None, 1, 1, ())
                for o in offsets]

    async def scenario() -> Any:
        consumer = app.consumer
        app.route_batches((tp.topic,), handler)
        app.topics._acking_topics.add(tp.topic)
        consumer._read_offset[tp] = None
        fetches = iter([range(100, 150), range(150, 160), range(100, 160)])

        async def next_records(timeout: float) -> Any:
            offsets = next(fetches)
            if offsets.start == 150:  # asked for during the seek, back after it
                await fetch_gate.wait()
            return {tp: records(offsets)}, None

        async def seek_to_committed() -> dict[TP, int]:  # the consumer thread's part
            await seek_gate.wait()
            return {tp: 100}

        consumer._wait_next_records = next_records
        consumer.seek_to_committed = seek_to_committed

        async def fetch_loop_step() -> None:
            async for _ in consumer.getmany(1.0):
                pass

        await asyncio.wait_for(fetch_loop_step(), 5.0)  # 100..149, before the seek
        await asyncio.wait_for(consumer._batch_idle.wait(), 5.0)
        seek = asyncio.ensure_future(consumer.perform_seek())
        await asyncio.sleep(0.01)
        step = asyncio.ensure_future(fetch_loop_step())  # asks for 150..159
        await asyncio.sleep(0.01)
        seek_gate.set()
        await asyncio.wait_for(seek, 5.0)
        assert consumer._read_offset[tp] == 100
        fetch_gate.set()
        await asyncio.wait_for(step, 5.0)
        assert handled == [list(range(100, 150))]  # 150..159 dropped: no gap over 101..150
        assert not consumer._gap[tp]
        await asyncio.wait_for(fetch_loop_step(), 5.0)  # read again from the committed 100
        await asyncio.wait_for(consumer._batch_idle.wait(), 5.0)
        assert handled == [list(range(100, 150)), list(range(100, 160))]
        assert consumer._new_offset(tp) == 160

        # A seek that ends between the check and the hand-over: the batch is dropped too,
        # and the fetch loop drops its next fetch and reads again from the committed.
        stale = consumer._seeks - 2
        await consumer._deliver(handler, [(tp, records(range(160, 170)))], stale)
        assert len(handled) == 2 and consumer._reseek
        fetches = iter([range(160, 170), range(100, 170)])
        seeks = consumer._seeks
        await asyncio.wait_for(fetch_loop_step(), 5.0)
        assert len(handled) == 2 and not consumer._reseek and consumer._seeks == seeks + 2
        await asyncio.wait_for(fetch_loop_step(), 5.0)
        await asyncio.wait_for(consumer._batch_idle.wait(), 5.0)
        assert handled[2] == list(range(100, 170))
        return consumer

    consumer = run(scenario())
    consumer._thread.thread_loop.close()  # made for the consumer's thread, never started


def test_a_gap_over_acknowledged_offsets_lets_the_commit_pass_in_one_step(prefix, tmp_path):
    # Faust adds the gaps to the acknowledged offsets before it looks for the run to
    # commit; offsets in both then stopped its run search at each one, and the commit
    # moved an offset or two per commit (robinhood/faust#625).
    from faust.transport.consumer import Consumer
    from faust.types import TP

    from streams.app import create_app
    from streams.settings import Settings

    tp = TP(prefix + "labels", 2)

    async def scenario(new_offset: Callable[[Any, TP], int | None]) -> tuple[Any, list[Any]]:
        consumer = create_app(Settings(topic_prefix=prefix, data_dir=tmp_path), 8).consumer
        consumer._committed_offset[tp] = 100
        consumer._acked[tp] = list(range(100, 150))  # handed over before a seek back to 100
        consumer._acked_index[tp] = set(range(100, 150))
        await consumer._add_gap(tp, 101, 150)  # a fetch from 150 on, after it
        consumer._acked[tp] += range(150, 160)
        consumer._acked_index[tp].update(range(150, 160))
        commits = []
        while (offset := new_offset(consumer, tp)) is not None and len(commits) < 100:
            commits.append(offset)
            consumer._committed_offset[tp] = offset
        return consumer, commits

    consumer, commits = run(scenario(lambda c, tp: c._new_offset(tp)))
    consumer._thread.thread_loop.close()
    assert commits == [160]
    assert consumer._acked[tp] == [] and not consumer._gap[tp]
    # Faust's own method, on the same offsets: a commit per one or two offsets.
    consumer, commits = run(scenario(lambda c, tp: Consumer._new_offset(c, tp)))
    consumer._thread.thread_loop.close()
    assert commits[:3] == [102, 103, 104] and len(commits) > 50


def test_changelog_writes_arrive_whole_in_order_on_their_partition(kafka_broker, prefix,
                                                                   tmp_path):
    # write() packs a batch's changes into aiokafka record batches of ~16 KiB; recovery
    # rebuilds the tables from exactly these records, so every key, value and deletion
    # must land, in order, on the changelog partition of the input partition.
    from models.join import wal_key
    from streams.app import create_app
    from streams.settings import Settings
    from streams.tables import declare_tables, write

    settings = Settings(broker=f"kafka://{kafka_broker}", topic_prefix=prefix,
                        data_dir=tmp_path)
    app = create_app(settings, 4)
    tables = declare_tables(app, 4, settings)
    assert tables.join is not None
    topic = tables.join.changelog_topic.get_topic_name()
    run(create_topics(kafka_broker, {topic: 4}))
    changes: dict[str, bytes | None] = {f"id-{i:05d}": b"v" * (i % 300) for i in range(3000)}
    changes["id-00007"] = None  # a deletion travels as a tombstone
    changes[wal_key(2)] = b"w" * 600_000  # a write-ahead entry alone exceeds a batch

    async def send() -> int:
        await app.producer.start()
        try:
            acks = await write(tables.join, 2, changes)
            await asyncio.gather(*acks)
            return len(acks)
        finally:
            await app.producer.stop()

    batches = run(send())
    records = run(read_topic(kafka_broker, topic))
    assert [(r.partition, r.key.decode(), r.value) for r in records] == [
        (2, key, value) for key, value in changes.items()]
    assert 2 < batches < len(changes)  # batched, and split where a batch is full


def test_the_worker_keeps_start_up_objects_out_of_the_collector():
    # A full collection walked ~150,000 start-up objects every time: ~95 ms, 14% of a
    # busy worker's CPU. The worker freezes them, and collects its young generation only
    # once 100,000 more objects live than before: more than a batch makes.
    import gc
    import weakref

    from streams.cli import keep_gc_off_the_event_path

    class Node:
        me: object

    threshold = gc.get_threshold()
    try:
        keep_gc_off_the_event_path()
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold() == (100_000, 10, 10)
        node = Node()
        node.me = node  # a cycle made after the freeze
        alive = weakref.ref(node)
        del node
        gc.collect()
        assert alive() is None  # is still collected

        # Cycles that become garbage as the worker runs are collected without an
        # explicit collection: at most the threshold's worth of them live at a time.
        refs = []
        for _ in range(250_000):
            node = Node()
            node.me = node
            refs.append(weakref.ref(node))
            del node
        live = sum(ref() is not None for ref in refs)
        assert 0 < live <= 100_000
        assert refs[0]() is None  # the first ones went in a collection along the way
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_the_join_keeps_its_entries_in_the_dict_faust_recovers_the_table_into(prefix,
                                                                               tmp_path):
    # The join reads and writes the plain dict under Faust's memory store (the store's
    # own get costs two Python calls and a KeyError per miss): recovery must land there.
    from types import SimpleNamespace

    from streams.app import create_app
    from streams.settings import Settings
    from streams.tables import declare_tables, entries

    settings = Settings(topic_prefix=prefix, data_dir=tmp_path)
    app = create_app(settings, 4)
    tables = declare_tables(app, 4, settings)
    assert tables.join is not None
    join = entries(tables.join, 0)
    assert type(join) is dict
    join["a"] = b"1"
    assert tables.join.data["a"] == b"1"

    def changelog(key: bytes, value: bytes | None) -> SimpleNamespace:
        return SimpleNamespace(key=key, value=value,
                               message=SimpleNamespace(key=key, value=value, partition=3))

    tables.join.data.apply_changelog_batch(
        [changelog(b"b", b"2"), changelog(b"a", None)], bytes.decode,
        lambda value: value)
    assert join == {"b": b"2"}  # recovered into it: a set key, a tombstone
    tables.join.data._clear()  # what a rebalance does to the memory store
    assert join == {} and entries(tables.join, 3) is join


def test_a_rocksdb_partition_holds_only_what_its_changelog_acknowledged(tmp_path):
    """Under rocksdb:// a change is seen at once, and reaches the database only with the
    changelog offset that acknowledged it: a kill -9 leaves the changelog's state. A
    database that would skip another writer's records, or a partition revoked
    meanwhile, does not take the offset."""
    import rocksdict

    from streams.durable import Held, PartitionEntries

    offset_key, synced_key = b"__faust\x00offset__", b"__driftwarden\x00synced__"
    db = rocksdict.Rdict(str(tmp_path / "p3.db"), rocksdict.Options(raw_mode=True))
    db[b"old"], db[offset_key] = b"0", b"40"
    held = Held()
    part = PartitionEntries(lambda partition: {3: db}[partition], 3, held)
    part["a"], part["b"] = b"1", b"2"
    del part["old"]
    assert (part.get("a"), part.get("old"), "old" in part, sorted(part.items())) == (
        b"1", None, False, [("a", b"1"), ("b", b"2")])
    assert dict(db.items()) == {b"old": b"0", offset_key: b"40"}  # none acknowledged
    sent = [("a", b"1"), ("b", b"2"), ("old", None)]
    part["a"] = b"3"  # changed again while the write was on its way
    before = time.time()
    part.commit(sent, 41, 43)
    stored = dict(db.items())
    assert before <= float(stored.pop(synced_key)) <= time.time()
    assert stored == {b"a": b"1", b"b": b"2", offset_key: b"43"}
    assert held.pending == {"a": b"3"} and part["a"] == b"3" and len(part) == 2
    with pytest.raises(KeyError):
        del part["old"]

    # A reading since the write was sent applied it, and a later value: left as it is.
    part["b"] = b"5"
    db[b"b"], db[offset_key] = b"6", b"50"
    part.commit([("b", b"5")], 44, 44)
    assert (held.pending, db[b"b"], db[offset_key]) == ({"a": b"3"}, b"6", b"50")
    # A reading applied the first of its two records: written, and marked to its end.
    part.commit([("a", b"3")], 50, 51)
    assert (held.pending, db[b"a"], db[offset_key]) == ({}, b"3", b"51")

    part["d"] = b"7"
    part.commit([("d", b"7")], 52, 54, contiguous=False)  # another writer's batch among
    assert (db[b"d"], db.get(offset_key), db.get(synced_key)) == (b"7", None, None)
    part["e"] = b"8"
    part.commit([("e", b"8")], 55, 55)  # no offset to follow: still none
    assert (db[b"e"], db.get(offset_key), held.pending) == (b"8", None, {})

    held.revoked = True
    part["c"] = b"4"
    part.commit([("c", b"4")], 56, 56)
    assert db.get(b"c") is None
    db.close()


def test_a_rocksdb_write_of_several_batches_is_contiguous_only_when_they_are(tmp_path):
    """The batches of one changelog write are acknowledged with their base offsets; one
    that does not follow the last (another writer's batch between) is a gap."""
    import rocksdict

    from streams.durable import Held, PartitionEntries, _committed

    offset_key = b"__faust\x00offset__"
    db = rocksdict.Rdict(str(tmp_path / "p0.db"), rocksdict.Options(raw_mode=True))
    part = PartitionEntries(lambda partition: db, 0, Held())

    async def commit(bases: list[int], counts: list[int], key: str) -> None:
        acks = []
        for base in bases:
            ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            ack.set_result(SimpleNamespace(offset=base))
            acks.append(ack)
        part[key] = key.encode()
        await _committed(part, [(key, key.encode())], acks, counts, None)

    db[offset_key] = b"9"
    run(commit([10, 13], [3, 2], "x"))  # 10-12, 13-14
    assert (db[b"x"], db[offset_key]) == (b"x", b"14")
    run(commit([15, 18], [2, 1], "y"))  # 15-16, then 18: offset 17 is another's
    assert (db[b"y"], db.get(offset_key)) == (b"y", None)
    db.close()


def _send_to_partition_1(broker: str, topic: str,
                         items: tuple[tuple[bytes, bytes | None], ...]) -> None:
    """Publish ``items`` (key, value) to partition 1 of ``topic``, each acknowledged."""
    from aiokafka import AIOKafkaProducer

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            for key, value in items:
                await producer.send_and_wait(topic, value, key=key, partition=1)
        finally:
            await producer.stop()
    run(go())


def _memory_join_store(broker: str, prefix: str, tmp_path: Any) -> tuple[Any, Any]:
    """A worker's memory store of the join table, not started, and partition 1 of its
    changelog (made on the broker with 2 partitions)."""
    from aiokafka import TopicPartition

    from streams.app import create_app
    from streams.settings import Settings
    from streams.tables import declare_tables

    settings = Settings(topic_prefix=prefix, data_dir=tmp_path, broker=f"kafka://{broker}")
    store = declare_tables(create_app(settings, 2), 2, settings).join.data
    topic = settings.changelog("join")
    run(create_topics(broker, {topic: 2}))
    return store, TopicPartition(topic, 1)


def test_the_table_store_reads_its_changelog_on_from_where_it_stopped(kafka_broker, prefix,
                                                                     tmp_path, caplog):
    """``ChangelogReader._read`` of the memory store on the real broker: from the start
    for a partition new to it, on from the last offset for one it holds, and, out of
    time, no further than it got (Faust's recovery reads the rest from there)."""

    store, tp = _memory_join_store(kafka_broker, prefix, tmp_path)
    topic = tp.topic

    def send(*items: tuple[bytes, bytes | None]) -> None:
        _send_to_partition_1(kafka_broker, topic, items)

    send((b"a", b"1"), (b"b", b"2"), (b"a", b"3"))
    store.data["stale"] = b"x"  # what it held of partition 1 from an earlier assignment
    store._key_partition["stale"] = 1
    assert run(store._read({tp}, time.monotonic() + 30)) == 3
    assert (store.data, store.persisted_offset(tp)) == ({"a": b"3", "b": b"2"}, 2)

    send((b"b", None), (b"c", b"4"))  # a tombstone and a new key
    assert run(store._read({tp}, time.monotonic() + 30)) == 2  # on from offset 3
    assert (store.data, store.persisted_offset(tp)) == ({"a": b"3", "c": b"4"}, 4)
    assert store._key_partition == {"a": 1, "c": 1}

    # Out of time before a fetch: a partition it held keeps its offset; a new one has
    # none, so Faust's recovery reads it from its start.
    send((b"d", b"5"))
    assert run(store._read({tp}, time.monotonic() - 1)) == 0
    assert store.persisted_offset(tp) == 4
    store._read_to.clear()
    assert run(store._read({tp}, time.monotonic() - 1)) == 0
    assert store.persisted_offset(tp) is None and store.data == {}
    assert "reading changelog partitions stopped after 0 records (TimeoutError" in caplog.text


def test_a_changelog_reading_applies_nothing_once_a_newer_rebalance_began(
        kafka_broker, prefix, tmp_path, caplog, monkeypatch):
    """The store reads its changelogs in Faust's recovery task, which a newer rebalance
    cancels only after that rebalance's callback has run the store's ``on_rebalance``.
    A fetch that comes back in between is not applied: it could be of a partition just
    taken away, and bring back an offset whose entries the store then drops. Here the
    rebalance begins (Faust's driver moves the consumer generation, as its assignment
    arrives) while the first fetch is awaited."""
    from aiokafka import AIOKafkaConsumer

    caplog.set_level("INFO", logger="streams.tables")
    store, tp = _memory_join_store(kafka_broker, prefix, tmp_path)
    topic = tp.topic
    _send_to_partition_1(kafka_broker, topic, [(b"a", b"1"), (b"b", b"2")])
    fetch = AIOKafkaConsumer.getmany

    async def fetch_then_rebalance(consumer: Any, *tps: Any, **kwargs: Any) -> Any:
        fetched = await fetch(consumer, *tps, **kwargs)
        store.app.consumer_generation_id += 1
        return fetched

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", fetch_then_rebalance)
    assert run(store._read({tp}, time.monotonic() + 30)) == 0
    assert (store.data, store.persisted_offset(tp)) == ({}, None)  # Faust: from the start
    assert "stopped after 0 records (_Overtaken: a newer rebalance began)" in caplog.text
    assert "as recovery starts" not in caplog.text  # no line that it read them
    monkeypatch.setattr(AIOKafkaConsumer, "getmany", fetch)
    assert run(store._read({tp}, time.monotonic() + 30)) == 2  # the next one reads it
    assert (store.data, store.persisted_offset(tp)) == ({"a": b"1", "b": b"2"}, 1)
    assert "read 2 changelog records of 1 partitions (1 newly assigned)" in caplog.text


def test_a_changelog_reading_ends_within_its_limit_when_the_broker_does_not_answer(
        tmp_path, caplog, monkeypatch):
    """However the reading goes, it ends within ``READ_LIMIT_SECONDS`` with a warning:
    Faust's recovery gives up for good on a step that outlasts its request timeout, and
    the worker would then never resume. Here the reader's consumer never starts."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    import streams.tables
    from streams.app import create_app
    from streams.settings import Settings
    from streams.tables import declare_tables

    settings = Settings(topic_prefix="t.", data_dir=tmp_path, broker="kafka://127.0.0.1:9")
    store = declare_tables(create_app(settings, 2), 2, settings).join.data

    async def never(consumer: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(AIOKafkaConsumer, "start", never)
    monkeypatch.setattr(streams.tables, "READ_LIMIT_SECONDS", 1.0)
    tp = TopicPartition(settings.changelog("join"), 0)
    started = time.monotonic()
    run(store.read_ahead({tp}))
    assert time.monotonic() - started < 5.0
    assert store.persisted_offset(tp) is None
    assert "reading changelog partitions took over 1 s" in caplog.text


def test_a_recovery_overtaken_by_a_rebalance_reads_no_further_table(tmp_path):
    """Faust's recovery task is cancelled only after a newer rebalance's callback: the
    recovery whose first table's reading that rebalance overtook reads no other table
    (its partitions are no longer this worker's) and records no offset; it stops, and
    Faust starts the next recovery."""
    from faust.tables.recovery import RebalanceAgain
    from faust.types import TP

    from streams.app import create_app
    from streams.settings import Settings
    from streams.tables import declare_tables

    settings = Settings(topic_prefix="t.", data_dir=tmp_path, broker="kafka://127.0.0.1:9")
    app = create_app(settings, 2)
    tables = declare_tables(app, 2, settings)
    app.consumer_generation_id = 4
    recovery = app.tables.recovery
    read: list[str] = []

    def reading(table: Any, rebalance: bool) -> Any:
        async def read_ahead(tps: Any) -> None:
            read.append(table.name)
            if rebalance:  # as the driver does when a rebalance's assignment arrives
                app.consumer_generation_id = 5
        return read_ahead

    for table, rebalance in ((tables.join, True), (tables.models, False)):
        table.data.read_ahead = reading(table, rebalance)
        tp = table.changelog_topic.get_topic_name()
        recovery.actives_for_table[table] = {TP(tp, 0)}
    with pytest.raises(RebalanceAgain):
        run(recovery._build_highwaters(None, set(), {}, "active"))
    assert read == ["join"]
    assert dict(recovery.active_offsets) == {}


def test_the_rocksdb_store_reads_on_from_its_database_unless_a_day_old(kafka_broker, prefix,
                                                                        tmp_path):
    """``ChangelogReader._read`` of the RocksDB store (``streams.durable``) on the real broker:
    from the start into an empty database, on from the offset the database holds, and from
    the start again, wiping it, when it was last in step with its changelog longer ago than
    the broker keeps tombstones (a deletion since may be gone from the changelog: its entry
    would live on)."""
    from aiokafka import TopicPartition

    from streams.app import create_app
    from streams.durable import TOMBSTONES_KEPT_SECONDS
    from streams.settings import Settings
    from streams.tables import declare_tables

    settings = Settings(topic_prefix=prefix, data_dir=tmp_path, broker=f"kafka://{kafka_broker}",
                        store="rocksdb://")
    store = declare_tables(create_app(settings, 2), 2, settings).join.data
    topic = settings.changelog("join")
    run(create_topics(kafka_broker, {topic: 2}))
    tp = TopicPartition(topic, 1)
    db = store._db_for_partition(1)

    def send(*items: tuple[bytes, bytes | None]) -> None:
        _send_to_partition_1(kafka_broker, topic, items)

    def held() -> dict[str, bytes]:
        return dict(store.partition_entries(1).items())

    send((b"a", b"1"), (b"b", b"2"), (b"a", b"3"))
    assert run(store._read({tp}, time.monotonic() + 30)) == 3
    assert (held(), store.persisted_offset(tp)) == ({"a": b"3", "b": b"2"}, 2)
    send((b"b", None), (b"c", b"4"))  # a tombstone and a new key
    assert run(store._read({tp}, time.monotonic() + 30)) == 2  # on from offset 3
    assert (held(), store.persisted_offset(tp)) == ({"a": b"3", "c": b"4"}, 4)

    db[b"zombie"] = b"5"  # as if its tombstone had been cleaned from the changelog since
    db[b"__driftwarden\x00synced__"] = repr(time.time() - TOMBSTONES_KEPT_SECONDS
                                            + 5).encode()
    assert run(store._read({tp}, time.monotonic() + 30)) == 0  # in step 5 s within it
    db[b"__driftwarden\x00synced__"] = repr(time.time() - TOMBSTONES_KEPT_SECONDS
                                            - 5).encode()
    assert run(store._read({tp}, time.monotonic() + 30)) == 5  # from the start
    assert (held(), store.persisted_offset(tp)) == ({"a": b"3", "c": b"4"}, 4)


def test_a_recovery_completing_late_drops_what_the_latest_assignment_does_not_hold(
        prefix, tmp_path):
    # The store reads a rebalance's new partitions before Faust's recovery of the one
    # before may have completed; Faust's store would then drop the partitions that
    # recovery did not have (2, being read already) and keep those it had (0, gone).
    from faust.types import TP

    from streams.app import create_app
    from streams.settings import Settings
    from streams.tables import declare_tables

    settings = Settings(topic_prefix=prefix, data_dir=tmp_path)
    store = declare_tables(create_app(settings, 4), 4, settings).join.data
    store.data.update({"gone": b"1", "kept": b"2", "new": b"3"})
    store._key_partition.update({"gone": 0, "kept": 1, "new": 2})
    store._held = {1, 2}
    topic = settings.changelog("join")
    run(store.on_recovery_completed({TP(topic, 0), TP(topic, 1)}, set()))
    assert store.data == {"kept": b"2", "new": b"3"}
    assert store._key_partition == {"kept": 1, "new": 2}


def test_the_producer_compresses_with_the_configured_codec(prefix, tmp_path):
    # What the worker writes goes compressed: a quarter of the bytes for the broker.
    from models.errors import ConfigError
    from streams.app import create_app
    from streams.settings import Settings

    env = {"DRIFTWARDEN_TOPIC_PREFIX": prefix, "DRIFTWARDEN_DATA_DIR": str(tmp_path)}
    # The producer compresses with zstd unless told otherwise ("none": not at all).
    assert create_app(Settings.from_env(env), 8).conf.producer_compression_type == "zstd"
    for name, expected in (("lz4", "lz4"), ("none", None)):
        configured = create_app(Settings.from_env({**env, "DRIFTWARDEN_COMPRESSION": name}), 8)
        assert configured.conf.producer_compression_type == expected
    with pytest.raises(ConfigError, match="DRIFTWARDEN_COMPRESSION must be one of none, "):
        Settings.from_env({**env, "DRIFTWARDEN_COMPRESSION": "brotli"})


def test_the_producer_compresses_zstd_at_level_1(prefix, tmp_path):
    # aiokafka compresses zstd at level 3 and has no setting for it; the worker sets 1
    # (half the time, and smaller, on its batches). Held on both of aiokafka's record
    # batch builders, the compiled one its producer uses and the pure-Python one.
    import cramjam
    from aiokafka.record import default_records

    from streams.app import create_app
    from streams.settings import Settings

    create_app(Settings.from_env({"DRIFTWARDEN_TOPIC_PREFIX": prefix,
                                  "DRIFTWARDEN_DATA_DIR": str(tmp_path)}), 8)
    values = [orjson.dumps({"id": f"p-{i}", "features": {f"n{j}": (i * 7919 + j) % 1000 / 7
                                                         for j in range(16)}})
              for i in range(300)]

    def batch(builder: Any, codec: int) -> bytes:
        b = builder(magic=2, compression_type=codec, is_transactional=False, producer_id=-1,
                    producer_epoch=-1, base_sequence=-1, batch_size=1 << 24)
        for i, value in enumerate(values):
            b.append(i, timestamp=1_700_000_000_000, key=None, value=value, headers=[])
        return bytes(b.build())

    header = default_records.DefaultRecordBase.HEADER_STRUCT.size
    builders = [default_records.DefaultRecordBatchBuilder,
                default_records._DefaultRecordBatchBuilderPy]
    assert builders[0] is not builders[1]  # the compiled builder is the one in use
    for builder in builders:
        plain = batch(builder, 0)[header:]
        packed = batch(builder, default_records.DefaultRecordBase.CODEC_ZSTD)[header:]
        assert packed == bytes(cramjam.zstd.compress(plain, level=1))
        assert packed != bytes(cramjam.zstd.compress(plain, level=3))


def test_the_consumer_fetches_up_to_fetch_bytes_and_waits_at_most_100_ms_for_min_bytes(
        prefix, tmp_path):
    # One model's records share a partition of the records topic: with 128 KiB fetches
    # the model stage got one message per fetch, and with Faust's 1,500 ms fetch wait
    # about one fetch a second once the inputs were read; it starved either way. (2 MiB
    # kept it in step with the join on the bench input, 1 MiB leaves it 1.7 s behind;
    # but with 2 MiB hostile input left the worker 21-27% larger, test_hostile.) And a
    # fetch waits, up to those 100 ms, for DRIFTWARDEN_FETCH_MIN_BYTES: at a steady rate
    # Kafka's 1 byte made a join batch, and its writes, of every few hundred events.
    from models.errors import ConfigError
    from streams.app import create_app
    from streams.settings import Settings

    env = {"DRIFTWARDEN_TOPIC_PREFIX": prefix, "DRIFTWARDEN_DATA_DIR": str(tmp_path)}
    app = create_app(Settings.from_env(env), 8)
    assert app.conf.consumer_max_fetch_size == 1024 * 1024
    assert app.fetch_min_bytes == 256 * 1024
    app = create_app(Settings.from_env({**env, "DRIFTWARDEN_FETCH_BYTES": "8388608",
                                        "DRIFTWARDEN_FETCH_MIN_BYTES": "1"}), 8)
    assert app.conf.consumer_max_fetch_size == 8 * 1024 * 1024
    with pytest.raises(ConfigError, match="DRIFTWARDEN_FETCH_BYTES"):
        Settings.from_env({**env, "DRIFTWARDEN_FETCH_BYTES": "1000"})
    with pytest.raises(ConfigError, match="DRIFTWARDEN_FETCH_MIN_BYTES must be between 1"):
        Settings.from_env({**env, "DRIFTWARDEN_FETCH_MIN_BYTES": "0"})

    async def made() -> tuple[int, int, int]:
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            return (consumer._fetch_max_wait_ms, consumer._max_partition_fetch_bytes,
                    consumer._fetch_min_bytes)
        finally:
            await consumer.stop()

    try:
        assert run(made()) == (100, 8 * 1024 * 1024, 1)
    finally:
        app.consumer._thread.thread_loop.close()  # made for the consumer's thread, unused


def test_a_backlog_reaches_the_join_in_publish_order_not_labels_first(start_worker,
                                                                       kafka_broker, prefix):
    # A fetch takes up to DRIFTWARDEN_FETCH_BYTES of each partition and a label is a tenth
    # of a prediction's size: over a backlog the join read the labels topic to its end
    # before the predictions they belong to, keeping every label as a join entry ("L")
    # until its prediction came: state in proportion to the backlog. A label now waits
    # until the predictions published before it on its partition were handed over.
    from collections import Counter

    from streams.bench_e2e import stream
    from streams.settings import Settings
    from streams.topics import TopicNames, ensure_topics

    settings = Settings(broker=f"kafka://{kafka_broker}", topic_prefix=prefix)
    run(ensure_topics(settings))
    names = TopicNames.from_settings(settings)
    n = 20_000  # ~1.7 MB of predictions per partition, its labels 0.1 MB: one fetch
    run(produce(kafka_broker, stream(names, n, seed=5, start_ts=time.time())))
    worker = start_worker()
    wait_until(lambda: worker.total("driftwarden_outcomes_total") >= n, 120, "every outcome")
    assert worker.total("driftwarden_outcomes_total") == n
    assert worker.total("driftwarden_pending_labels") == 0
    changelog = run(read_topic(kafka_broker, settings.changelog("join")))
    kinds = Counter(orjson.loads(r.value)[0] for r in changelog
                    if r.value is not None and not r.key.startswith(b"\x00"))
    # Every id ends matched ("D", written once); none waited as a label.
    assert kinds["D"] == n and kinds["L"] == 0, kinds


def test_held_labels_go_on_with_their_predictions_or_once_those_stall(monkeypatch):
    from types import SimpleNamespace

    from faust.types import TP

    import streams.app as app_module
    from streams.app import HOLD_SECONDS, _ConsumerThread, _Held

    now = [1000.0]
    monkeypatch.setattr(app_module, "monotonic", lambda: now[0])
    lead, later = TP("p", 3), TP("l", 3)
    state = SimpleNamespace(has_valid_position=True, position=5, highwater=10)
    states = {lead: state}
    consumer = SimpleNamespace(_subscription=SimpleNamespace(subscription=SimpleNamespace(
        assignment=SimpleNamespace(state_value=states.get))))
    thread = object.__new__(_ConsumerThread)  # only its held-records bookkeeping is used
    thread._held, thread._lead = {}, {3: (150, now[0])}
    held = thread._held[later] = _Held(now[0])
    held.records = [SimpleNamespace(offset=i, timestamp=ts)
                    for i, ts in enumerate([100, 140, 200, 300])]

    def release(limit=None):
        return {tp: [r.offset for r in rs]
                for tp, rs in thread._release(consumer, "p", limit).items()}

    # Published before the newest prediction handed over: on; the rest wait.
    assert release(limit=1) == {later: [0]}
    assert release() == {later: [1]}
    assert release() == {} and [r.offset for r in held.records] == [2, 3]
    # The predictions move on past 200: 200 goes.
    thread._lead[3] = (250, now[0])
    assert release() == {later: [2]}
    # They hand nothing over for HOLD_SECONDS, though not read to their end: the rest go.
    now[0] += HOLD_SECONDS + 0.1
    assert release() == {later: [3]} and thread._held == {}
    # Predictions read to their high watermark, or not assigned here: nothing waits.
    for position, assigned in ((10, True), (5, False)):
        state.position = position
        if not assigned:
            del states[lead]
        thread._held[later] = _Held(now[0])
        thread._held[later].records = [SimpleNamespace(offset=9, timestamp=10**6)]
        assert release() == {later: [9]}


@pytest.mark.parametrize("policy", ["earliest", "latest"])
def test_a_seek_back_without_a_committed_offset_goes_where_the_consumer_started(policy):
    # Dropped fetches and held labels are read again from the committed offsets. aiokafka
    # seeks only partitions committed above 0, so a worker that started after one killed
    # before its first commit stayed past what it dropped: 811 predictions never came
    # (the kill -9 test, 1 run in 5). Offset 0 is sought, no offset means the reset
    # policy; a table's changelog, read by Faust's recovery and never committed, stays.
    from types import SimpleNamespace

    from aiokafka.structs import TopicPartition

    from streams.app import _ConsumerThread, _Held

    none, zero, five, changelog = (TopicPartition("predictions", 0),
                                   TopicPartition("labels", 0),
                                   TopicPartition("labels", 1),
                                   TopicPartition("app-join-changelog", 0))
    committed = {none: None, zero: 0, five: 5, changelog: None}
    calls: list[tuple[str, object]] = []

    async def seek_to_committed():  # aiokafka's: seeks only offsets above 0
        calls.append(("seek", (five, 5)))
        return committed

    async def seek_to(name, *tps):
        calls.append((name, set(tps)))

    thread = object.__new__(_ConsumerThread)
    thread._held, thread._lead = {zero: _Held(0.0)}, {0: (1, 0.0)}
    thread._consumer = SimpleNamespace(
        seek_to_committed=seek_to_committed,
        seek=lambda tp, offset: calls.append(("seek", (tp, offset))),
        seek_to_beginning=lambda *tps: seek_to("beginning", *tps),
        seek_to_end=lambda *tps: seek_to("end", *tps))
    thread.app = SimpleNamespace(conf=SimpleNamespace(consumer_auto_offset_reset=policy),
                                 tables=SimpleNamespace(changelog_topics={changelog.topic}))

    assert asyncio.run(thread._forget_and_seek()) == committed
    assert thread._held == {} and thread._lead == {}
    reset = "beginning" if policy == "earliest" else "end"
    assert calls == [("seek", (five, 5)), ("seek", (zero, 0)), (reset, {none})]


def test_records_format_records_sends_one_record_per_prediction(kafka_broker, prefix,
                                                                 tmp_path):
    # Model stages of earlier releases cannot read a run of predictions as columns:
    # DRIFTWARDEN_RECORDS_FORMAT=records keeps the join to the form they read, for a
    # rolling upgrade (README, "Topics").
    from aiokafka import AIOKafkaConsumer

    from models.errors import ConfigError
    from models.join import JoinPartition, decode_records
    from models.simulation import WideScenario, simulate_wide
    from streams.agents import Pipeline
    from streams.app import create_app
    from streams.metrics import Snapshot
    from streams.settings import Settings
    from streams.tables import declare_tables
    from streams.topics import TopicNames, ensure_topics

    part = JoinPartition({}, partition=0, ttl=600.0)
    for offset, ev in enumerate(simulate_wide(WideScenario(n=40, seed=1))):
        part.absorb("predictions", orjson.dumps(ev.value), offset, ev.ts)
    records = part.drain().records
    assert Settings.from_env({}).records_format == "runs"
    with pytest.raises(ConfigError, match="DRIFTWARDEN_RECORDS_FORMAT must be one of runs, "):
        Settings.from_env({"DRIFTWARDEN_RECORDS_FORMAT": "columns"})

    def sent(records_format: str) -> list[str]:
        """The entry kinds the join's records message holds with this setting."""
        settings = Settings.from_env({"DRIFTWARDEN_BROKER": f"kafka://{kafka_broker}",
                                      "DRIFTWARDEN_TOPIC_PREFIX": f"{prefix}{records_format}.",
                                      "DRIFTWARDEN_DATA_DIR": str(tmp_path),
                                      "DRIFTWARDEN_RECORDS_FORMAT": records_format})
        partitions = run(ensure_topics(settings))
        app = create_app(settings, partitions)
        pipeline = Pipeline(app, settings, declare_tables(app, partitions, settings),
                            Snapshot(max_models=10))
        topic = TopicNames.from_settings(settings).model_records

        async def send_and_read() -> bytes:
            await app.producer.start()
            try:
                await pipeline._send(records, [])
            finally:
                await app.producer.stop()
            consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_broker,
                                        auto_offset_reset="earliest")
            await consumer.start()
            try:
                message = await asyncio.wait_for(consumer.getone(), 30)
            finally:
                await consumer.stop()
            return message.value

        raw = run(send_and_read())
        items = list(decode_records("wide", raw))
        assert [r for item in items for r in (
            item.offsets if not hasattr(item, "position") else [item.position[0]])] == list(
            range(40))
        return [entry[0] for entry in orjson.loads(raw)]

    assert sent("runs") == ["c"]
    assert sent("records") == ["e"] * 40


# Fixed (streams/agents.py, models.performance.recoverable): the model stage dead-letters
# a records message it cannot absorb, but caught only Exception; river's Rust detectors
# panic with pyo3's PanicException, a BaseException, which went past it and stopped the
# worker at that message on every restart. (The policy file now refuses the parameters
# that panicked.)
def test_a_detector_panic_is_dead_lettered_and_an_interrupt_is_not():
    from river.drift import ADWIN

    from models.performance import recoverable as _recoverable

    detector = ADWIN(clock=0)
    with pytest.raises(BaseException) as caught:
        detector.update(1.0)
    assert type(caught.value).__name__ == "PanicException"
    assert not isinstance(caught.value, Exception)
    assert _recoverable(caught.value)
    assert _recoverable(ValueError("math domain error"))
    assert not _recoverable(KeyboardInterrupt())
    assert not _recoverable(SystemExit(2))
