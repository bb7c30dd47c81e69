"""The join and the model stage as processes of their own (``DRIFTWARDEN_ROLE``).

A deployment runs both stages in every worker, or each stage in processes of its own,
each with a core and an interpreter lock. What users rely on: the split layout computes
exactly what one process does, survives kill -9 of either role, and a deployment can
switch layouts without losing state or reading its input again; two layouts never run
on the same topics at once.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from models.errors import ConfigError
from models.join import ModelRecord, encode_records
from models.simulation import Scenario
from streams.settings import Settings
from tests.streams.harness import (
    Worker,
    all_committed,
    group_lag,
    produce,
    report,
    retraining_ids,
    run,
    settle,
    wait_until,
)
from tests.streams.oracle import merged, oracle, records

START = float(int(time.time()))
MODELS = [f"m{k}" for k in range(4)]


def scenarios(n_per_model: int) -> list[Scenario]:
    # m3's error rate rises from 10% to 40% half-way: one retraining event expected.
    return [Scenario(n=n_per_model, model=m, version="1", seed=300 + k, unlabelled=0.05,
                     change_at=n_per_model // 2 if m == "m3" else None,
                     error_before=0.1, error_after=0.4, rate=40.0, start_ts=START)
            for k, m in enumerate(MODELS)]


def test_role_settings_name_groups_apart_and_changelogs_alike() -> None:
    for role, group in (("all", "p.driftwarden"), ("join", "p.driftwarden-join"),
                        ("monitor", "p.driftwarden-monitor")):
        settings = Settings.from_env({"DRIFTWARDEN_ROLE": role, "DRIFTWARDEN_TOPIC_PREFIX": "p."})
        assert settings.group == group
        assert settings.changelog("join") == "p.driftwarden-join-changelog"
    with pytest.raises(ConfigError, match="DRIFTWARDEN_ROLE must be one of all, join, monitor"):
        Settings.from_env({"DRIFTWARDEN_ROLE": "both"})


@pytest.mark.parametrize(("role", "tables"), [("all", {"join", "models"}), ("join", {"join"}),
                                              ("monitor", {"models"})])
def test_each_role_declares_its_own_tables_on_the_shared_changelogs(role, tables, tmp_path):
    from streams.agents import Pipeline
    from streams.app import create_app
    from streams.metrics import Snapshot
    from streams.tables import declare_tables

    settings = Settings(topic_prefix="p.", data_dir=tmp_path, role=role)
    app = create_app(settings, 8)
    assert app.conf.id == settings.group  # the consumer group
    declared = declare_tables(app, 8, settings)
    assert set(app.tables) == tables
    for name, table in app.tables.items():
        assert table.changelog_topic.get_topic_name() == f"p.driftwarden-{name}-changelog"
        assert getattr(declared, name) is table
    writes = Pipeline(app, settings, declared, Snapshot()).producer_topics()
    assert ("p.driftwarden-model-records" in writes) == (role != "monitor")
    assert ("p.retraining" in writes) == (role != "join")


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_two_roles_killed_in_turn_lose_nothing_and_count_nothing_twice(
        start_worker, kafka_broker, prefix, tmp_path, store):
    events = merged(scenarios(40_000))  # 160,000 predictions, 5% never labelled
    expected = oracle(events)
    assert expected.retraining_ids == {"m3:1:000001"}

    def role_worker(role: str, wait: bool = True) -> Worker:
        """Under rocksdb:// a killed role's successor opens its databases."""
        return start_worker(wait=wait, DRIFTWARDEN_ROLE=role, DRIFTWARDEN_STORE=store,
                            DRIFTWARDEN_DATA_DIR=str(tmp_path / role))

    roles = {"join": role_worker("join"), "monitor": role_worker("monitor")}
    publisher = ThreadPoolExecutor(1)
    published = publisher.submit(run, produce(kafka_broker, records(prefix, events),
                                              throttle=6_500.0))

    def done() -> bool:
        return published.done() and run(group_lag(
            kafka_broker, prefix + "driftwarden-join",
            [prefix + "predictions", prefix + "labels"])) == 0

    # Four kills, the roles in turn, ~10 s apart while the input is published (~50 s): a
    # restarted role waits out its dead predecessor's session (10 s) before it resumes,
    # and with one process per role nothing else takes its partitions meanwhile.
    rng = random.Random(8)
    kills: Counter[str] = Counter()
    for role in ("join", "monitor", "join", "monitor"):
        next_kill = time.monotonic() + 10.0 + rng.uniform(-2.0, 2.0)
        while time.monotonic() < next_kill and not done():
            time.sleep(0.5)
        if done():
            break
        proc = roles[role].proc
        assert proc is not None and proc.poll() is None, roles[role].log_text()[-3000:]
        proc.kill()  # SIGKILL: no commit, no flush, no goodbye to the group
        proc.wait(timeout=30)
        kills[role] += 1
        time.sleep(2.0)
        roles[role] = role_worker(role, wait=False)
    try:
        wait_until(done, 300, "the join to consume every input event")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; publisher done: {published.done()}"
            f"{f' ({published.exception()!r})' if published.done() else ''}; kills {kills}; "
            f"{report(list(roles.values()))}") from None
    publisher.shutdown()
    assert published.result() == len(events)
    assert kills["join"] >= 2 and kills["monitor"] >= 1, kills
    for worker in roles.values():
        worker.wait_ready(timeout=180)

    settle(list(roles.values()), expected, MODELS,
           "every expected outcome after kill -9 of each role")
    all_committed(kafka_broker, prefix)  # both roles' groups
    assert set(retraining_ids(kafka_broker, prefix)) == expected.retraining_ids
    # Each role exports what it owns: the join the predictions and pending labels, the
    # model stage the outcomes and accuracy.
    join, monitor = (roles[r].metrics() for r in ("join", "monitor"))
    assert not any(name == "driftwarden_outcomes_total" for name, _ in join)
    assert not any(name == "driftwarden_predictions_total" for name, _ in monitor)
    info = {dict(labels)["role"] for (name, labels) in {**join, **monitor}
            if name == "driftwarden_worker_info"}
    assert info == {"join", "monitor"}


def test_a_deployment_switches_layouts_keeping_its_state_and_reading_nothing_twice(
        start_worker, kafka_broker, prefix):
    events = merged(scenarios(10_000))
    half = len(events) // 2
    first = oracle(events[:half])
    expected = oracle(events)
    one = start_worker()  # creates the topics
    run(produce(kafka_broker, records(prefix, events[:half])))
    settle([one], first, MODELS, "the first half, one process")
    one.stop()

    # Two processes take over from the same changelogs, and their new consumer groups
    # start where the one-process group left off.
    roles = [start_worker(DRIFTWARDEN_ROLE="join"), start_worker(DRIFTWARDEN_ROLE="monitor")]
    for worker in roles:
        assert "starts where the other layout's groups left off" in worker.log_text()
    run(produce(kafka_broker, records(prefix, events[half:])))
    settle(roles, expected, MODELS, "the whole input, two processes")
    for worker in roles:
        assert worker.total("driftwarden_replays_skipped_total") == 0

    # While they run, a one-process worker refuses to start on the same topics.
    refused = start_worker(wait=False, DRIFTWARDEN_SESSION_TIMEOUT_SECONDS="6")
    assert refused.proc is not None
    assert refused.proc.wait(timeout=120) == 2
    assert "DRIFTWARDEN_ROLE=join read the topics" in refused.log_text() or (
        "DRIFTWARDEN_ROLE=monitor read the topics" in refused.log_text())

    # And back: one process again, nothing re-read, the same numbers.
    for worker in roles:
        worker.stop()
    again = start_worker()
    settle([again], expected, MODELS, "the whole input, one process again")
    assert again.total("driftwarden_replays_skipped_total") == 0
    assert set(retraining_ids(kafka_broker, prefix)) == expected.retraining_ids


def test_the_model_stage_reads_what_its_group_committed_past_from_the_broker(
        start_worker, kafka_broker, prefix):
    """faust-streaming can commit past records-topic messages the model stage never saw
    (a CI run under kill -9 lost 773 outcomes so). Here the group's offsets are moved
    past unread messages while no worker runs: on one partition later messages follow
    the hole, on the other the hole runs to the end. The next worker absorbs all."""
    topic = prefix + "driftwarden-model-records"
    first = start_worker(DRIFTWARDEN_ROLE="monitor")
    count = run(partition_count(kafka_broker, topic))
    every = list(range(count))
    partitioner = DefaultPartitioner()

    def part(model: str) -> int:
        return int(partitioner(model.encode(), every, every))

    models = ["a", next(m for m in (f"b{k}" for k in range(100)) if part(m) != part("a"))]

    def message(model: str, k: int) -> tuple[str, bytes, bytes]:
        # One outcome per message, from join partition 0's batch k + 1; every third wrong.
        item = [START + k, "1", "0" if k % 3 == 0 else "1", None, None, 1.0]
        [(_, raw)] = encode_records([ModelRecord("o", model, "1", "o0", (k + 1, 0), item)])
        return topic, model.encode(), raw

    run(produce(kafka_broker, [message(m, k) for k in range(4) for m in models]))
    wait_until(lambda: all(first.value("driftwarden_outcomes_total", model=m, version="1") == 4
                           for m in models), 60, "4 outcomes of each model")
    first.stop()  # commits: each partition's messages 0-3
    run(produce(kafka_broker, [message(m, k) for k in range(4, 10) for m in models]))
    a, b = (TopicPartition(topic, part(m)) for m in models)
    run(commit(kafka_broker, prefix + "driftwarden-monitor", {a: 7, b: 10}))

    second = start_worker(DRIFTWARDEN_ROLE="monitor")
    wait_until(lambda: all(second.value("driftwarden_outcomes_total", model=m, version="1")
                           == 10 for m in models), 60,
               "10 outcomes of each model: messages 4-6 of a and 4-9 of b from the broker")
    for m in models:  # messages 0, 3, 6 and 9 are wrong
        assert second.value("driftwarden_accuracy", model=m, version="1",
                            window="cumulative") == 0.6
    assert second.log_text().count("never reached the agent; read them from the broker") == 2


async def partition_count(broker: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        await admin.close()


async def commit(broker: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit ``offsets`` for ``group`` (which must have no live member)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()
