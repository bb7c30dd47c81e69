"""Fault injection on the real broker: SIGKILLed workers, compared with an oracle.

Two workers share 8 partitions while the input is published over about a minute (as live
traffic: workers faster than the producer must still be killed mid-stream); one of them
is killed with SIGKILL every 10 s (+-3 s), once every input partition behind at the
last kill has committed more since, and restarted 2 s later until the input is published
and consumed and at least four kills were made. Afterwards the counts they export and
the retraining events they published must equal what ``models/`` computes in-process
from the same seeded input (``tests/streams/oracle.py``): nothing lost, nothing twice.
"""

from __future__ import annotations

import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest

from models.simulation import Scenario
from tests.streams.harness import (
    ROOT,
    all_committed,
    group_lag,
    group_offsets,
    labelled,
    produce,
    read_topic,
    retraining_ids,
    run,
    settle,
    wait_until,
    wrong,
)
from tests.streams.oracle import merged, oracle, records

START = float(int(time.time()))
MODELS = [f"m{k}" for k in range(4)]
BUDGET = 450.0  # seconds for the whole fault phase; the test fails past it (and within
#                 pytest's 600 s timeout, so the failure says how many kills it took)
RATE = 6_500.0  # records/s published: about 60 s for the 390,000 records
MIN_KILLS = 4  # the kills go on, once the input is consumed, until there were this many


def scenarios(n_per_model: int) -> list[Scenario]:
    # m3's error rate rises from 10% to 40% half-way: one retraining event expected.
    return [Scenario(n=n_per_model, model=m, version="1", seed=100 + k, unlabelled=0.05,
                     change_at=n_per_model // 2 if m == "m3" else None,
                     error_before=0.1, error_after=0.4, rate=40.0, start_ts=START)
            for k, m in enumerate(MODELS)]


def consumed(broker: str, prefix: str) -> bool:
    """Has the workers' group committed every input event?"""
    topics = [prefix + "predictions", prefix + "labels"]
    return run(group_lag(broker, prefix + "driftwarden", topics)) == 0


def input_offsets(broker: str, prefix: str) -> tuple[dict[Any, int], dict[Any, int]]:
    """(committed, end) of each input partition for the workers' group."""
    topics = [prefix + "predictions", prefix + "labels"]
    return run(group_offsets(broker, prefix + "driftwarden", topics))


def still(broker: str, prefix: str, at_kill: tuple[dict[Any, int], dict[Any, int]]
          ) -> list[str]:
    """The input partitions behind at the last kill that have committed nothing since.

    A kill waits until there are none, so it never lands before the worker restarted after
    the one before has recovered its tables and done some work: on a loaded machine a
    recovery (the whole join changelog of its partitions, 150,000 records) outlasted the
    10 s between kills, and kills that kept landing mid-recovery left half the partitions
    where they were.
    """
    committed, _ = input_offsets(broker, prefix)
    was, ends = at_kill
    return [f"{tp.topic}[{tp.partition}] at {was[tp]} of {ends[tp]}"
            for tp in sorted(was) if was[tp] < ends[tp] and committed[tp] <= was[tp]]


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_kill_9_every_10_seconds_loses_nothing_and_counts_nothing_twice(
        start_worker, kafka_broker, prefix, tmp_path, store):
    events = merged(scenarios(50_000))  # 200,000 predictions, 5% never labelled
    expected = oracle(events)
    assert sum(expected.predictions.values()) == 200_000
    assert expected.retraining_ids == {"m3:1:000001"}

    def env(slot: int) -> dict[str, str]:
        """Under rocksdb:// a killed worker's successor opens its databases."""
        return {"DRIFTWARDEN_PARTITIONS": "8", "DRIFTWARDEN_STORE": store,
                "DRIFTWARDEN_DATA_DIR": str(tmp_path / f"slot-{slot}")}

    workers = [start_worker(**env(0)), start_worker(**env(1))]
    publisher = ThreadPoolExecutor(1)
    published = publisher.submit(run, produce(kafka_broker, records(prefix, events),
                                              throttle=RATE))

    def done() -> bool:  # kills that come after the input is consumed still count
        return kills >= MIN_KILLS and published.done() and consumed(kafka_broker, prefix)

    rng = random.Random(6)
    kills = 0
    at_kill = input_offsets(kafka_broker, prefix)
    deadline = time.monotonic() + BUDGET
    started = time.monotonic()
    while not done():
        assert time.monotonic() < deadline, (
            f"input not consumed after {BUDGET:.0f}s and {kills} kills")
        next_kill = time.monotonic() + 10.0 + rng.uniform(-3.0, 3.0)
        while not done() and (time.monotonic() < next_kill
                              or still(kafka_broker, prefix, at_kill)):
            assert time.monotonic() < deadline, (
                f"input not consumed after {BUDGET:.0f}s and {kills} kills; committed "
                f"nothing since the last kill: {still(kafka_broker, prefix, at_kill)}")
            time.sleep(0.5)
        if done():
            break
        at_kill = input_offsets(kafka_broker, prefix)
        victim = rng.randrange(2)
        proc = workers[victim].proc
        assert proc is not None and proc.poll() is None, workers[victim].log_text()[-3000:]
        proc.kill()  # SIGKILL: no commit, no flush, no goodbye to the group
        proc.wait(timeout=30)
        kills += 1
        time.sleep(2.0)
        workers[victim] = start_worker(wait=False, **env(victim))

    publisher.shutdown()
    assert published.result() == len(events)  # re-raises what the publisher raised
    print(f"input consumed after {time.monotonic() - started:.0f}s and {kills} kills")
    # Settle: both workers up, the model stage caught up, each model exported once.
    for worker in workers:
        worker.wait_ready(timeout=180)

    settle(workers, expected, MODELS, "every expected outcome, each model exported once")
    all_committed(kafka_broker, prefix)  # the records topic's too, not only the inputs'

    ids = retraining_ids(kafka_broker, prefix)
    assert set(ids) == expected.retraining_ids, ids


#: Loaded by the worker's interpreter (``sitecustomize``): each reading of changelog
#: partitions first waits DW_TEST_READ_DELAY seconds, as a long changelog would.
SLOW_READ = '''
import asyncio
import os

import streams.tables

_read = streams.tables.ChangelogReader._read
_DELAY = float(os.environ["DW_TEST_READ_DELAY"])


async def _slow_read(self, tps, deadline):
    await asyncio.sleep(_DELAY)
    return await _read(self, tps, deadline + _DELAY)


streams.tables.ChangelogReader._read = _slow_read
'''


def test_a_changelog_read_longer_than_the_session_keeps_the_workers_in_their_group(
        start_worker, kafka_broker, prefix, tmp_path):
    """Each worker reads its changelogs as its recovery starts, while its heartbeats go
    on. Read inside the assignment callback (aiokafka heartbeats only after it returns),
    two readings of 5 s with a 6 s session had the broker drop the worker from its
    group while it went on to process the partitions it had been given; a CI run lost 40
    to 70 outcomes of each model to such a worker. Here both workers stay members of
    the generation they joined, and the counts are exact."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SLOW_READ)
    env = {"PYTHONPATH": f"{inject}{os.pathsep}{ROOT}", "DW_TEST_READ_DELAY": "5",
           "DRIFTWARDEN_SESSION_TIMEOUT_SECONDS": "6", "DRIFTWARDEN_PARTITIONS": "8"}
    events = merged(scenarios(2_000))
    expected = oracle(events)
    assert sum(expected.predictions.values()) == 8_000
    first = start_worker(**env)
    assert run(produce(kafka_broker, records(prefix, events))) == len(events)
    second = start_worker(**env)
    workers = [first, second]
    settle(workers, expected, MODELS, "every expected outcome, each model exported once")
    for worker in workers:
        log = worker.log_text()
        assert "changelog records of" in log  # the reading ran (and waited)
        for dropped in ("member_id was not recognized", "Heartbeat session expired"):
            assert dropped not in log, f"{dropped!r} in {worker.log_path}: {log[-3000:]}"
    # The first worker joined alone, then with the second; each joined as often.
    joins = [re.findall(r"Joined group .* \(generation (\d+)\)", w.log_text())
             for w in workers]
    assert joins == [["1", "2"], ["2"]], joins


#: Loaded by the worker's interpreter (``sitecustomize``): once the model stage has sent a
#: retraining event (``streams.agents`` encodes nothing else with orjson), the worker
#: exits at its next write of a model's state, so the events are on the topic and the
#: state that fired them is not stored.
EXIT_AFTER_EVENTS = '''
import os

import orjson

import streams.agents

_write = streams.agents.write
_sent = []


class _Orjson:
    def __getattr__(self, name):
        return getattr(orjson, name)

    def dumps(self, obj, *args, **kwargs):
        _sent.append(obj)
        return orjson.dumps(obj, *args, **kwargs)


async def _write_or_exit(table, partition, changes):
    if _sent and table.name == "models":
        os._exit(17)
    return await _write(table, partition, changes)


streams.agents.orjson = _Orjson()
streams.agents.write = _write_or_exit
'''


def test_a_batch_absorbed_again_under_a_changed_policy_fires_as_the_first_time(
        start_worker, kafka_broker, prefix, tmp_path):
    """The model stage sends a batch's retraining events before it stores the states.
    Killed in between and restarted with a changed policy file, the worker absorbs the
    batch again under the policy it had, so it publishes the same event again (the same
    id, which consumers drop), and the next real event takes the next id. Applied at
    once, the new policy (a 50% drop, not 10%) fired nothing on the replay, and the next
    event took the id already published, for consumers to drop as a duplicate."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(EXIT_AFTER_EVENTS)
    policy = tmp_path / "policy.toml"
    policy.write_text("[default]\nwindow = 10\nmin_outcomes = 10\naccuracy_drop = 0.1\n"
                      "cooldown_seconds = 0\n")
    env = {"DRIFTWARDEN_PARTITIONS": "1", "DRIFTWARDEN_POLICY_FILE": str(policy)}
    mv = {"model": "m", "version": "0"}


    first = start_worker(PYTHONPATH=f"{inject}{os.pathsep}{ROOT}", **env)
    run(produce(kafka_broker, labelled(prefix, range(20), "m", wrong((12, 15)))))
    wait_until(lambda: first.proc.poll() is not None, 60, "the worker to exit after the event")
    assert first.proc.returncode == 17
    fired = [r.value for r in run(read_topic(kafka_broker, prefix + "retraining", idle=2.0))]
    assert [orjson.loads(v)["id"] for v in fired] == ["m:0:000001"]

    policy.write_text("[default]\nwindow = 10\nmin_outcomes = 10\naccuracy_drop = 0.5\n"
                      "cooldown_seconds = 0\n")
    second = start_worker(**env)
    wait_until(lambda: second.value("driftwarden_outcomes_total", **mv) == 20, 60,
               "the 20 outcomes, absorbed again")
    # 10 right (the latch re-arms), then 6 of 10 wrong: 0.4, under the new 50% drop.
    later = (labelled(prefix, range(20, 30), "m")
             + labelled(prefix, range(30, 40), "m", wrong((31, 32, 34, 35, 37, 38))))
    run(produce(kafka_broker, later))
    wait_until(lambda: second.value("driftwarden_outcomes_total", **mv) == 40, 60,
               "the 40 outcomes")
    events = [r.value for r in run(read_topic(kafka_broker, prefix + "retraining", idle=3.0))]
    assert events[:2] == [fired[0], fired[0]]  # byte for byte, the same event again
    assert [(e["id"], e["reasons"][0]["threshold"], e["evidence"]["outcomes_seen"])
            for e in map(orjson.loads, events)] == [
        ("m:0:000001", 0.9, 16), ("m:0:000001", 0.9, 16), ("m:0:000002", 0.5, 39)]
