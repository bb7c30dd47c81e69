"""The prediction/label join of one partition, over a plain dict as its store."""

from __future__ import annotations

import random
from itertools import groupby

import orjson
import pytest

from models.columns import OutcomeRun
from models.errors import StateError
from models.join import (
    DeadLetter,
    Flush,
    InputRecord,
    JoinPartition,
    ModelRecord,
    count_key,
    decode_records,
    encode_records,
    expiry_heaps,
    meta_key,
    outcome_records,
    split_count_key,
    wal_key,
)
from models.simulation import Scenario, simulate

TTL = 60.0
Event = tuple[str, bytes, float]  # (topic, value, Kafka timestamp)


def prediction(event_id: str, ts: float, model: str = "m", version: str = "1",
               prediction: object = 1, scores: dict[str, float] | None = None) -> bytes:
    doc = {"id": event_id, "model": model, "version": version, "ts": ts,
           "features": {"x": 1.0}, "prediction": prediction}
    if scores is not None:
        doc["scores"] = scores
    return orjson.dumps(doc)


def label(event_id: str, ts: float, value: object = 1, model: str | None = None) -> bytes:
    doc = {"id": event_id, "label": value, "ts": ts}
    if model is not None:
        doc["model"] = model
    return orjson.dumps(doc)


class Feed:
    """Hands events to a JoinPartition with consecutive offsets per topic, like Kafka."""

    def __init__(self, part: JoinPartition) -> None:
        self.part = part
        self.next = {"predictions": 0, "labels": 0}

    def __call__(self, topic: str, raw: bytes, kafka_ts: float | None = None) -> int:
        offset = self.next[topic]
        self.next[topic] += 1
        self.part.absorb(topic, raw, offset, orjson.loads(raw)["ts"] if kafka_ts is None
                         else kafka_ts)
        return offset


def new(store: dict[str, bytes] | None = None, partition: int = 0) -> tuple[JoinPartition, Feed]:
    part = JoinPartition({} if store is None else store, partition=partition, ttl=TTL)
    return part, Feed(part)


def outcomes(part: JoinPartition) -> list[ModelRecord]:
    return [r for r in part.records if r.kind == "o"]


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl"):
        JoinPartition({}, partition=0, ttl=0)


def test_prediction_then_label_gives_one_outcome() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0, scores={"0": 0.25, "1": 0.75}))
    feed("labels", label("a", 130.0, value=0))
    assert part.records == [
        ModelRecord("p", "m", "1", "p0", (0, 0), [100.0, {"x": 1.0}, 1.0, 0.75]),
        # [ts, prediction, label, p_label, confidence, delay]
        # o records are positioned by batch (the first is 1), not by the completing event.
        ModelRecord("o", "m", "1", "o0", (1, 0), [130.0, 1.0, 0.0, 0.25, 0.75, 30.0]),
    ]
    assert part.counts == {"predictions": {"m|1": 1}, "matched": {"m|1": 1}}
    assert part.pending() == 0
    assert part.dead_letters == []


def test_label_before_prediction_gives_the_outcome_when_the_prediction_arrives() -> None:
    part, feed = new()
    feed("labels", label("a", 130.0))
    assert part.records == [] and part.pending() == 0
    feed("predictions", prediction("a", 100.0))
    assert [(r.kind, r.source, r.position) for r in part.records] == [
        ("p", "p0", (0, 0)), ("o", "o0", (1, 0))]
    assert outcomes(part)[0].item == [130.0, 1.0, 1.0, None, None, 30.0]
    assert part.counts["matched"] == {"m|1": 1}
    assert part.pending() == 0


def test_outcome_without_scores_has_no_probability_and_unknown_class_scores_zero() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0, scores={"0": 0.4, "1": 0.6}))
    feed("labels", label("a", 101.0, value="2"))  # a class the model gave no score
    assert outcomes(part)[0].item[3:5] == [0.0, 0.6]


def test_duplicate_prediction_first_wins_and_is_dead_lettered() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0, prediction=1))
    dup = prediction("a", 100.0, prediction=0)
    feed("predictions", dup)
    feed("labels", label("a", 110.0, value=1))
    assert [r.item[1] for r in outcomes(part)] == [1.0]  # the first prediction was joined
    assert part.dead_letters == [DeadLetter("predictions", 0, 1, "duplicate_prediction", dup)]
    assert part.counts == {"predictions": {"m|1": 1}, "matched": {"m|1": 1},
                           "dead": {"predictions|duplicate_prediction": 1}}


def test_an_id_naming_the_joins_own_entries_is_dead_lettered_and_harms_nothing() -> None:
    # The join keys its meta and write-ahead entries "\x00meta:N" and "\x00wal:N": an event
    # with such an id read them as its entry and raised KeyError, stopping the worker on
    # every restart (the batch was never acknowledged).
    store: dict[str, bytes] = {}
    part, feed = new(store)
    feed("predictions", prediction("a", 100.0))
    part.drain()  # meta and write-ahead entries now stored
    assert {meta_key(0), wal_key(0)} <= set(store)
    for event_id in (meta_key(0), wal_key(0), meta_key(1)):
        feed("predictions", prediction(event_id, 101.0))
        feed("labels", label(event_id, 101.0, model="m"))
    feed("labels", label("a", 110.0))
    assert [(d.topic, d.reason) for d in part.dead_letters] == [
        ("predictions", "invalid_id"), ("labels", "invalid_id")] * 3
    assert [r.item[1:3] for r in outcomes(part)] == [[1.0, 1.0]]
    part.drain()
    assert meta_key(1) not in store
    assert JoinPartition(store, partition=0, ttl=TTL).counts == part.counts


def test_duplicate_prediction_after_the_match_is_dead_lettered() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0))
    feed("labels", label("a", 110.0))
    feed("predictions", prediction("a", 100.0))
    assert [d.reason for d in part.dead_letters] == ["duplicate_prediction"]
    assert part.counts["predictions"] == {"m|1": 1}
    assert len(outcomes(part)) == 1


def test_duplicate_label_first_wins_and_is_dead_lettered() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0))
    feed("labels", label("a", 110.0, value=1))
    dup = label("a", 120.0, value=0)
    feed("labels", dup)
    assert [r.item[2] for r in outcomes(part)] == [1.0]
    assert part.dead_letters == [DeadLetter("labels", 0, 1, "duplicate_label", dup)]
    assert part.counts["matched"] == {"m|1": 1}
    assert part.counts["dead"] == {"labels|duplicate_label": 1}


def test_duplicate_label_before_the_prediction_first_wins() -> None:
    part, feed = new()
    feed("labels", label("a", 110.0, value=1))
    feed("labels", label("a", 111.0, value=0))
    feed("predictions", prediction("a", 100.0))
    assert [r.item[2] for r in outcomes(part)] == [1.0]
    assert [(d.reason, d.offset) for d in part.dead_letters] == [("duplicate_label", 1)]


def test_label_naming_another_model_is_dead_lettered_and_the_prediction_stays_pending() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0, model="fraud"))
    bad = label("a", 110.0, model="churn")
    feed("labels", bad)
    assert outcomes(part) == []
    assert part.dead_letters == [DeadLetter("labels", 0, 0, "model_mismatch", bad)]
    assert part.pending() == 1
    feed("labels", label("a", 111.0, model="fraud"))  # the right label still joins
    assert len(outcomes(part)) == 1 and part.pending() == 0


def test_early_label_naming_another_model_is_dead_lettered_when_the_prediction_arrives() -> None:
    part, feed = new()
    bad = label("a", 110.0, model="churn")
    part.absorb("labels", bad, 0, 110.0, key=b"tenant-7")  # keyed by other than its id
    feed("predictions", prediction("a", 100.0, model="fraud"))
    assert outcomes(part) == []
    # Dead-lettered with the key it came with, not its id.
    assert part.dead_letters == [DeadLetter("labels", 0, 0, "model_mismatch", bad,
                                            b"tenant-7")]
    assert part.counts["dead"] == {"labels|model_mismatch": 1}
    assert part.pending() == 1


def test_invalid_event_is_dead_lettered_with_its_key_and_offset_and_the_rest_flows() -> None:
    part, _ = new()
    part.absorb("predictions", b"{not json", 0, 100.0, key=b"k0")
    part.absorb("predictions", prediction("a", 100.0), 1, 100.0)
    part.absorb("labels", None, 0, 101.0)  # a tombstone
    part.absorb("labels", label("a", 101.0), 1, 101.0)
    assert part.dead_letters == [
        DeadLetter("predictions", 0, 0, "invalid_json", b"{not json", b"k0"),
        DeadLetter("labels", 0, 0, "invalid_json", None, None),  # no value, as it came
    ]
    assert len(outcomes(part)) == 1
    assert part.counts["dead"] == {"predictions|invalid_json": 1, "labels|invalid_json": 1}


def test_unlabelled_prediction_expires_by_the_labels_event_time() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0))
    # Predictions racing ahead (a labels backlog) must not expire it.
    feed("predictions", prediction("b", 10_000.0))
    part.expire()
    assert "a" in part.store and part.pending() == 2
    # Labels exactly ttl newer: not yet.
    feed("labels", label("zzz", 100.0 + TTL))
    part.expire()
    assert "a" in part.store and part.pending() == 2
    # Labels more than ttl newer: gone, counted, not dead-lettered.
    feed("labels", label("yyy", 100.0 + TTL + 0.5))
    part.expire()
    assert "a" not in part.store
    assert part.counts["expired"] == {"m|1": 1}
    assert part.pending() == 1  # "b" still waits
    # An expired prediction is counted, not dead-lettered: the only dead letters are the
    # two filler labels, whose predictions never came.
    assert sorted(d.raw for d in part.dead_letters) == [label("yyy", 100.0 + TTL + 0.5),
                                                         label("zzz", 100.0 + TTL)]
    # Published with no key (feed), dead-lettered with none.
    assert {(d.key, d.reason) for d in part.dead_letters} == {(None, "unmatched_label")}
    assert part.watermark("p") == 10_000.0 and part.watermark("l") == 160.5


@pytest.mark.parametrize("model", ["a|b", "C:\\models\\", "plain"])
def test_a_version_is_counted_under_one_key_that_splits_back_to_it(model: str) -> None:
    # Predicted, matched and expired all count under count_key(model, version); a name
    # without a bar keeps the key earlier releases stored ("model|version").
    part, feed = new()
    feed("predictions", prediction("p1", 100.0, model=model, version="v|1"))
    feed("predictions", prediction("p2", 100.0, model=model, version="v|1"))
    feed("labels", label("p1", 101.0))
    feed("labels", label("later", 100.0 + TTL + 1))  # expires p2
    part.expire()
    keys = {counter: set(part.counts[counter]) for counter in ("predictions", "matched",
                                                                "expired")}
    key = count_key(model, "v|1")
    assert keys == {"predictions": {key}, "matched": {key}, "expired": {key}}
    assert split_count_key(key) == (model, "v|1")
    assert (key == f"{model}|v|1") == ("|" not in model)


def test_a_label_dated_far_ahead_of_its_kafka_timestamp_expires_nothing() -> None:
    # Its event time would move the labels' watermark, and with it every pending
    # prediction of the partition out. More than a day ahead it is dead-lettered; a day
    # ahead (the most allowed) moves the watermark by that day only.
    part, feed = new()
    for i in range(5):
        feed("predictions", prediction(f"p{i}", 1_000_000.0 + i))
    feed("labels", label("late", 1_000_000.0 + 300 * 86400), kafka_ts=1_000_010.0)
    part.expire()
    assert part.pending() == 5 and "expired" not in part.counts
    assert [(d.key, d.reason) for d in part.dead_letters] == [(None, "ts_out_of_range")]
    assert part.watermark("l") < 1_000_000.0
    feed("labels", label("p0", 1_000_010.0 + 86400), kafka_ts=1_000_010.0)
    assert part.watermark("l") == 1_000_010.0 + 86400
    assert len(outcomes(part)) == 1 and part.pending() == 4


def test_unmatched_label_expires_by_the_predictions_event_time_into_a_dead_letter() -> None:
    part, feed = new()
    raw = label("a", 100.0)
    part.absorb("labels", raw, 7, 100.0, key=b"a")
    feed("labels", label("b", 5_000.0))  # labels racing ahead do not expire it
    part.expire()
    assert "a" in part.store
    feed("predictions", prediction("c", 100.0 + TTL))
    part.expire()
    assert "a" in part.store
    feed("predictions", prediction("d", 100.0 + TTL + 1))
    part.expire()
    assert "a" not in part.store
    assert part.dead_letters == [DeadLetter("labels", 0, 7, "unmatched_label", raw, b"a")]
    assert part.counts["dead"] == {"labels|unmatched_label": 1}


def test_a_waiting_label_is_dead_lettered_with_the_key_it_came_with() -> None:
    # "Loses nothing": a dead letter carries the original bytes and key. DESIGN.md keys
    # labels by id, and such a label stores no key; any other key (bytes that are not
    # UTF-8, none at all) is kept in its entry, through a restart, and for a later label
    # of the same id too.
    store: dict[str, bytes] = {}
    part = JoinPartition(store, partition=0, ttl=TTL)
    sent = [("a", b"a", None), ("b", b"\xff\x00tenant", None), ("c", None, None),
            ("d", b"d", "fraud"), ("d", b"\x80second", "churn")]
    for offset, (event_id, key, model) in enumerate(sent):
        part.absorb("labels", label(event_id, 100.0, model=model), offset, 100.0, key=key)
    assert len(store["a"]) == len(orjson.dumps(orjson.loads(store["a"])))  # no key kept
    assert orjson.loads(store["a"])[7:] == []
    part.drain()

    part = JoinPartition(store, partition=0, ttl=TTL)  # as after a restart
    part.absorb("predictions", prediction("z", 100.0 + TTL + 1), 0, 100.0 + TTL + 1)
    part.expire()
    assert sorted((d.offset, d.key) for d in part.dead_letters) == [
        (0, b"a"), (1, b"\xff\x00tenant"), (2, None), (3, b"d"), (4, b"\x80second")]
    assert {d.reason for d in part.dead_letters} == {"unmatched_label"}


def test_matched_marker_catches_duplicates_until_both_sides_pass_the_ttl() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0))
    feed("labels", label("a", 110.0))
    feed("labels", label("late", 1_000.0))  # only one side moved on
    part.expire()
    assert orjson.loads(part.store["a"])[0] == "D"
    feed("predictions", prediction("a", 100.0))
    assert [d.reason for d in part.dead_letters] == ["duplicate_prediction"]
    feed("predictions", prediction("new", 1_000.0))
    part.expire()
    assert "a" not in part.store


def test_a_shorter_duplicate_window_forgets_matched_ids_sooner_and_nothing_else() -> None:
    part = JoinPartition({}, partition=0, ttl=TTL, duplicate_window=10.0)
    feed = Feed(part)
    feed("predictions", prediction("a", 100.0))
    feed("labels", label("a", 110.0))
    # The marker is dated by the prediction (100); both sides 9 s past it.
    feed("predictions", prediction("b", 109.0))
    feed("labels", label("c", 109.0))
    part.expire()
    feed("predictions", prediction("a", 100.0))  # still a duplicate
    assert [d.reason for d in part.dead_letters] == ["duplicate_prediction"]
    feed("predictions", prediction("b2", 115.0))
    feed("labels", label("c2", 115.0))
    part.expire()
    # The marker is gone (both sides are 15 s past it); pending entries wait a TTL.
    assert "a" not in part.store
    assert [orjson.loads(part.store[k])[0] for k in ("b", "c", "b2", "c2")] == list("PLPL")
    feed("predictions", prediction("a", 100.0))  # now joined anew: pending, not dead
    assert len(part.dead_letters) == 1 and orjson.loads(part.store["a"])[0] == "P"
    assert part.pending() == 3


@pytest.mark.parametrize("window", [0.0, TTL + 1])
def test_the_duplicate_window_is_within_the_ttl(window: float) -> None:
    with pytest.raises(ValueError, match="duplicate_window must be in"):
        JoinPartition({}, partition=0, ttl=TTL, duplicate_window=window)


def test_replays_at_or_below_absorbed_offsets_are_skipped_and_change_nothing() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0))  # offset 0
    feed("predictions", prediction("b", 101.0))  # offset 1
    feed("labels", label("a", 110.0))            # offset 0
    records, _, _, _ = part.drain()
    assert [r.kind for r in records] == ["p", "p", "o"]
    store_before = dict(part.store)
    part.absorb("predictions", prediction("a", 100.0), 1, 100.0)
    part.absorb("predictions", prediction("a", 100.0), 0, 100.0)
    part.absorb("labels", label("b", 110.0), 0, 110.0)
    part.absorb("labels", b"garbage", 0, 110.0)
    assert part.skipped == 4
    assert part.drain() == ([], [], {}, None)
    assert part.store == store_before
    assert part.counts == {"predictions": {"m|1": 2}, "matched": {"m|1": 1}}


def test_drain_hands_over_records_dead_letters_and_changed_entries() -> None:
    part, feed = new()
    feed("predictions", prediction("a", 100.0))
    feed("labels", b"[]", kafka_ts=100.0)
    records, dead, writes, _ = part.drain()
    assert [r.kind for r in records] == ["p"]
    assert [d.reason for d in dead] == ["not_an_object"]
    assert set(writes) == {"a", meta_key(0)}
    assert writes["a"] == part.store["a"]
    assert part.records == [] and part.dead_letters == [] and part.changed == {}
    # A deletion is handed over as None.
    feed("labels", label("z", 1_000.0))
    part.expire()
    assert part.drain()[2]["a"] is None


def test_fresh_partition_over_the_same_store_continues_after_a_crash() -> None:
    store: dict[str, bytes] = {}
    part, feed = new(store)
    feed("predictions", prediction("a", 100.0))
    feed("predictions", prediction("b", 101.0))
    feed("labels", label("c", 102.0))       # label first
    feed("labels", label("a", 110.0))
    part.drain()
    counts, pending = part.counts, part.pending()

    recovered = JoinPartition(store, partition=0, ttl=TTL)
    assert recovered.counts == counts and recovered.pending() == pending == 1
    assert (recovered.watermark("p"), recovered.watermark("l")) == (101.0, 110.0)
    # Kafka redelivers from the last committed offset: everything absorbed is skipped.
    recovered.absorb("predictions", prediction("b", 101.0), 1, 101.0)
    recovered.absorb("labels", label("a", 110.0), 1, 110.0)
    assert recovered.skipped == 2 and recovered.records == []
    # New events join with the state left behind.
    recovered.absorb("labels", label("b", 120.0), 2, 120.0)
    recovered.absorb("predictions", prediction("c", 102.0), 2, 102.0)
    assert [(r.kind, r.source, r.position) for r in recovered.records if r.kind == "o"] == [
        ("o", "o0", (2, 0)), ("o", "o0", (2, 1))]
    assert recovered.pending() == 0
    # Expiry heaps are rebuilt from the store.
    recovered.absorb("labels", label("x", 500.0), 3, 500.0)
    recovered.absorb("predictions", prediction("y", 500.0), 3, 500.0)
    recovered.expire()
    assert sorted(k for k in store if not k.startswith("\x00")) == ["x", "y"]


def test_partitions_sharing_one_store_keep_their_own_meta_and_entries() -> None:
    store: dict[str, bytes] = {}
    p0, feed0 = new(store, partition=0)
    p1, feed1 = new(store, partition=1)
    feed0("predictions", prediction("a", 100.0))
    feed1("predictions", prediction("b", 100.0))
    feed1("labels", label("z", 1_000.0))
    p1.expire()
    p0.drain(), p1.drain()
    assert "a" in store and "b" not in store
    assert JoinPartition(store, 0, TTL).pending() == 1
    assert JoinPartition(store, 1, TTL).counts["expired"] == {"m|1": 1}


# -- crash safety: what reaches Kafka, in which order -------------------------------------


def durable(changelog: dict[str, bytes], flush: Flush, stored: int | None = None) -> None:
    """Store a flush as the worker does: write-ahead entry first, then ``stored`` of the
    changed keys (all when None), as a crash part-way would leave the changelog."""
    assert flush.wal is not None
    changelog[wal_key(0)] = flush.wal
    for i, (key, value) in enumerate(flush.writes.items()):
        if stored is not None and i >= stored:
            break
        if value is None:
            changelog.pop(key, None)
        else:
            changelog[key] = value


def test_early_records_follow_from_bytes_alone_and_the_outbox_waits_for_the_wal() -> None:
    part, feed = new()
    feed("labels", label("a", 101.0))
    feed("predictions", prediction("a", 100.0))
    feed("predictions", b"{", 100.0)
    feed("predictions", prediction("a", 100.0))  # duplicate: depends on the state
    flush = part.drain()
    early, outbox = flush.early(), flush.outbox()
    assert [(r.kind, r.position) for r in early[0]] == [("p", (0, 0))]
    assert [d.reason for d in early[1]] == ["invalid_json"]
    assert [(r.kind, r.source, r.position) for r in outbox[0]] == [("o", "o0", (1, 0))]
    assert [d.reason for d in outbox[1]] == ["duplicate_prediction"]
    assert part.store[wal_key(0)] == flush.wal
    assert orjson.loads(flush.wal)["s"] == 1
    # The meta entry is written last: stored, it proves the batch's other keys are.
    assert list(flush.writes)[-1] == meta_key(0)


def test_a_crash_while_storing_a_batch_recovers_it_from_the_write_ahead_entry() -> None:
    memory: dict[str, bytes] = {}
    changelog: dict[str, bytes] = {}
    part, feed = new(memory)
    feed("predictions", prediction("a", 100.0))
    feed("predictions", prediction("b", 100.0))
    durable(changelog, part.drain())
    feed("labels", label("a", 110.0, value=0))
    feed("labels", label("b", 111.0))
    feed("predictions", prediction("c", 112.0))
    flush = part.drain()
    durable(changelog, flush, stored=1)  # killed after the first of four changed keys

    recovered = JoinPartition(changelog, partition=0, ttl=TTL)
    assert recovered.recovered is not None
    assert recovered.recovered.records == flush.outbox()[0]
    assert [r.item[1:3] for r in recovered.recovered.records] == [[1, 0], [1, 1]]
    assert {k: v for k, v in changelog.items() if k != wal_key(0)} == {
        k: v for k, v in memory.items() if k != wal_key(0)}
    assert recovered.counts == part.counts and recovered.pending() == 1
    # Kafka redelivers the batch: all of it is skipped, nothing is paired again.
    recovered.absorb("labels", label("a", 110.0), 0, 110.0)
    recovered.absorb("predictions", prediction("c", 112.0), 2, 112.0)
    assert recovered.skipped == 2 and recovered.records == []
    # Once the batch's keys are stored the write-ahead entry is spent.
    durable(changelog, flush)
    assert JoinPartition(changelog, partition=0, ttl=TTL).recovered is None


def test_partitions_opened_from_one_pass_over_the_store_expire_as_if_each_read_it() -> None:
    changelog: dict[str, bytes] = {}
    part, feed = new({})
    feed("predictions", prediction("a", 100.0))
    feed("predictions", prediction("b", 100.0))
    durable(changelog, part.drain())
    feed("labels", label("a", 110.0))
    feed("predictions", prediction("c", 112.0))
    durable(changelog, part.drain(), stored=0)  # "c" is in the write-ahead entry only
    other, feed1 = new(changelog, partition=1)
    feed1("predictions", prediction("z", 100.0))
    other.drain()

    heaps = expiry_heaps(changelog, {0, 1, 2})  # before partition 0 applies its entry
    assert sorted(heaps) == [0, 1]
    expired = []
    for partition in (0, 1):
        for given in (heaps[partition], None):  # the index, or a pass of its own
            store = dict(changelog)
            reopened = JoinPartition(store, partition, TTL, heaps=given)
            reopened.absorb("labels", label(f"late{partition}", 1_000.0), 9, 1_000.0)
            reopened.expire()
            expired.append((partition, reopened.counts["expired"], reopened.pending()))
    assert expired == [(0, {"m|1": 2}, 0), (0, {"m|1": 2}, 0),
                       (1, {"m|1": 1}, 0), (1, {"m|1": 1}, 0)]


def test_a_crash_before_the_write_ahead_entry_may_pair_differently_with_the_same_positions(
) -> None:
    changelog: dict[str, bytes] = {}
    part, feed = new(changelog)
    feed("predictions", prediction("a", 100.0))
    durable(changelog, part.drain())
    stored = dict(changelog)
    part.absorb("labels", label("c", 111.0), 0, 111.0)  # this time the label came first
    part.absorb("predictions", prediction("c", 110.0), 1, 110.0)
    first = part.drain().outbox()[0]  # the worker died before the write-ahead entry

    again = JoinPartition(stored, partition=0, ttl=TTL)
    assert again.recovered is None
    again.absorb("predictions", prediction("c", 110.0), 1, 110.0)  # now the other way round
    again.absorb("labels", label("c", 111.0), 0, 111.0)
    replayed = again.drain().outbox()[0]
    # Nothing of the first attempt's outbox was sent; the replay's takes the same place.
    assert [(r.source, r.position, r.item) for r in replayed] == [
        (r.source, r.position, r.item) for r in first] == [
        ("o0", (2, 0), [111.0, 1, 1, None, None, 1.0])]


def test_a_partition_follows_at_most_max_versions_model_versions() -> None:
    part = JoinPartition({}, partition=0, ttl=TTL, max_versions=2)
    feed = Feed(part)
    feed("predictions", prediction("a", 100.0, model="m1"))
    feed("predictions", prediction("b", 100.0, model="m2"))
    feed("predictions", prediction("c", 100.0, model="m3"))  # a third: refused
    feed("predictions", prediction("d", 100.0, model="m1", version="2"))
    feed("predictions", prediction("e", 100.0, model="m2"))  # known: accepted
    assert [(d.offset, d.reason) for d in part.dead_letters] == [
        (2, "too_many_models"), (3, "too_many_models")]
    assert part.counts["predictions"] == {"m1|1": 1, "m2|1": 2}
    assert [r.model for r in part.records] == ["m1", "m2", "m2"]
    # A flood of names keeps nothing per name, the models' regression flags included.
    for i in range(1_000):
        feed("predictions", prediction(f"flood-{i}", 100.0, model=f"flood-{i}"))
    assert len(part.dead_letters) == 1_002 and len(part._numeric) <= 2


def test_unreadable_meta_entry_raises_state_error() -> None:
    with pytest.raises(StateError, match="meta"):
        JoinPartition({meta_key(0): b"not json"}, partition=0, ttl=TTL)


# -- seeded streams -----------------------------------------------------------------------


def batches(events: list[Event], size: int = 50) -> list[list[Event]]:
    return [events[i:i + size] for i in range(0, len(events), size)]


def run_stream(
    batched: list[list[Event]], store: dict[str, bytes],
    part: JoinPartition | None = None, feed: Feed | None = None,
) -> tuple[JoinPartition, list[ModelRecord], list[DeadLetter]]:
    """Absorb batches of events, expiring and draining after each, like the worker."""
    if part is None or feed is None:
        part, feed = new(store)
    records: list[ModelRecord] = []
    dead: list[DeadLetter] = []
    for batch in batched:
        for topic, raw, ts in batch:
            feed(topic, raw, ts)
        part.expire()
        r, d, _, _ = part.drain()
        records += r
        dead += d
    return part, records, dead


def sim_events(seed: int, n: int = 3000) -> list[Event]:
    scenario = Scenario(n=n, seed=seed, label_delay=(0.0, 90.0), unlabelled=0.2)
    return [(e.topic, orjson.dumps(e.value), e.ts) for e in simulate(scenario)]


def store_kinds(store: dict[str, bytes]) -> dict[str, int]:
    kinds: dict[str, int] = {"P": 0, "L": 0, "D": 0}
    for key, raw in store.items():
        if not key.startswith("\x00"):
            kinds[orjson.loads(raw)[0]] += 1
    return kinds


def test_seeded_stream_accounts_for_every_prediction_and_label() -> None:
    events = sim_events(seed=11)[:4000]  # cut mid-stream: some entries still wait
    store: dict[str, bytes] = {}
    part, records, dead = run_stream(batches(events), store)
    c = {name: sum(bucket.values()) for name, bucket in part.counts.items()}
    n_labels = sum(topic == "labels" for topic, _, _ in events)
    unmatched = sum(d.reason == "unmatched_label" for d in dead)
    kinds = store_kinds(store)

    # Pinned for seed 11: a 90 s label delay against a 60 s TTL expires some of each side.
    assert (c["predictions"], c["matched"], c["expired"], part.pending()) == (2414, 1144, 842, 428)
    assert (n_labels, unmatched, kinds["L"]) == (1586, 266, 176)
    # Each prediction is matched, expired or still pending, and the store agrees.
    assert c["matched"] + c["expired"] + part.pending() == c["predictions"]
    assert kinds["P"] == part.pending()
    assert sum(r.kind == "p" for r in records) == c["predictions"]
    assert sum(r.kind == "o" for r in records) == c["matched"]
    # Each label is matched, dead-lettered unmatched or still waiting.
    assert c["matched"] + unmatched + kinds["L"] == n_labels
    assert {d.reason for d in dead} == {"unmatched_label"}


def test_records_taken_a_fetch_at_a_time_join_as_taken_one_at_a_time() -> None:
    # The worker hands each partition's run of records to absorb_many: the state, the
    # records and the dead letters must be what absorbing them one by one makes, with
    # bad events, duplicates and replayed offsets among them.
    rng = random.Random(7)
    events: list[tuple[str, InputRecord]] = []
    offsets = {"predictions": 0, "labels": 0}
    for topic, raw, ts in sim_events(seed=7, n=1500):
        roll = rng.random()
        if roll < 0.03:
            raw = raw[: len(raw) // 2]  # invalid JSON: a dead letter
        elif roll < 0.06:
            events.append((topic, InputRecord(offsets[topic], round(ts * 1000), b"k", raw)))
            offsets[topic] += 1  # the same event again: a duplicate
        elif roll < 0.08 and offsets[topic] > 3:
            replayed = offsets[topic] - 3  # at or below an absorbed offset: skipped
            events.append((topic, InputRecord(replayed, round(ts * 1000), b"k", raw)))
            continue
        events.append((topic, InputRecord(offsets[topic], round(ts * 1000), b"k", raw)))
        offsets[topic] += 1

    def run(many: bool) -> tuple[dict[str, bytes], list[Flush], int]:
        store: dict[str, bytes] = {}
        part = JoinPartition(store, partition=0, ttl=TTL)
        flushes = []
        for start in range(0, len(events), 200):
            batch = events[start:start + 200]
            runs = [(topic, [rec for _, rec in group]) for topic, group in groupby(
                batch, key=lambda event: event[0])]
            for topic, records in runs:
                if many:
                    assert part.absorb_many(topic, records) == len(records)
                else:
                    for rec in records:
                        part.absorb(topic, rec.value, rec.offset, rec.timestamp / 1000, rec.key)
            part.expire()
            flushes.append(part.drain())
        return store, flushes, part.skipped

    one_each, many = run(False), run(True)
    assert many == one_each  # write-ahead entries to the byte
    _, flushes, skipped = many
    dead = [d.reason for f in flushes for d in f.dead_letters]
    assert skipped > 0 and "invalid_json" in dead and "duplicate_prediction" in dead

    # A fetch of bad events only still stores its offsets; Kafka timestamps are in ms.
    part = JoinPartition({}, partition=0, ttl=TTL)
    assert part.absorb_many("predictions", [InputRecord(o, 5000, None, b"{") for o in (0, 1)]) == 2
    flush = part.drain()
    assert [d.offset for d in flush.dead_letters] == [0, 1] and meta_key(0) in flush.writes
    event = b'{"id": "a", "model": "m", "features": {}, "prediction": 1}'  # no ts of its own
    part.absorb_many("predictions", [InputRecord(2, 5000, None, event)])
    assert part.expected("predictions") == 3 and part.watermark("p") == 5.0


def test_duplicates_in_a_seeded_stream_change_no_count() -> None:
    events = sim_events(seed=5, n=2000)
    clean, clean_records, _ = run_stream(batches(events), {})

    rng = random.Random(5)
    dups = {"predictions": 0, "labels": 0}
    noisy = []
    for batch in batches(events):
        noisy_batch = []
        for event in batch:
            noisy_batch.append(event)
            if rng.random() < 0.05:  # redelivered at once: a duplicate with a new offset
                noisy_batch.append(event)
                dups[event[0]] += 1
        noisy.append(noisy_batch)
    part, records, _ = run_stream(noisy, {})

    assert dups == {"predictions": 99, "labels": 77}
    for name in ("predictions", "matched", "expired"):
        assert part.counts[name] == clean.counts[name]
    assert part.pending() == clean.pending()
    assert part.counts["dead"]["predictions|duplicate_prediction"] == dups["predictions"]
    assert part.counts["dead"]["labels|duplicate_label"] == dups["labels"]
    assert [r.item for r in records] == [r.item for r in clean_records]


def test_crash_and_redelivery_in_a_seeded_stream_gives_the_uninterrupted_result() -> None:
    events = sim_events(seed=3, n=2000)[:3000]  # cut mid-stream: some entries still wait
    whole, whole_records, whole_dead = run_stream(batches(events), {})
    assert len(whole_dead) > 0 and whole.pending() > 0

    store: dict[str, bytes] = {}
    cut = len(events) // 100 * 50  # a batch boundary half-way
    _, first_records, first_dead = run_stream(batches(events[:cut]), store)
    # Restart: a fresh object over the store; Kafka redelivers the last 100 events again.
    part, feed = new(store)
    for topic, _, _ in events[:cut - 100]:
        feed.next[topic] += 1
    _, records, dead = run_stream(batches(events[cut - 100:]), store, part, feed)

    assert part.skipped == 100
    assert part.counts == whole.counts
    assert part.pending() == whole.pending()
    assert [x.item for x in first_records + records] == [x.item for x in whole_records]
    assert [(x.topic, x.offset, x.reason) for x in first_dead + dead] == [
        (x.topic, x.offset, x.reason) for x in whole_dead]


def test_regression_model_dead_letters_non_numeric_predictions_and_labels() -> None:
    part = JoinPartition({}, partition=0, ttl=TTL, regression=lambda model: model == "price")
    feed = Feed(part)
    feed("predictions", prediction("a", 100.0, model="price", prediction="cheap"))
    feed("predictions", prediction("b", 100.0, model="price", prediction=12.5))
    feed("labels", label("b", 101.0, value=True))  # after its prediction
    feed("labels", label("c", 102.0, value="cat"))  # before its prediction
    feed("predictions", prediction("c", 103.0, model="price", prediction=3.0))
    feed("labels", label("b", 104.0, value=12.0))  # the right label still joins
    assert [(d.topic, d.offset, d.reason) for d in part.dead_letters] == [
        ("predictions", 0, "invalid_prediction"),
        ("labels", 0, "invalid_label"),
        ("labels", 1, "invalid_label"),
    ]
    assert [r.item[1:3] for r in outcomes(part)] == [[12.5, 12.0]]
    assert part.counts["dead"] == {"predictions|invalid_prediction": 1,
                                   "labels|invalid_label": 2}
    assert part.pending() == 1  # "c" still waits for a numeric label


def test_a_label_naming_another_model_does_not_shut_out_the_right_one() -> None:
    # All labels before the prediction: which one fits is known only when it comes.
    part, feed = new()
    feed("labels", label("a", 101.0, value=0, model="other"))
    feed("labels", label("a", 102.0, value=1, model="m"))
    feed("labels", label("a", 103.0, value=0))
    feed("predictions", prediction("a", 100.0))
    assert [(d.offset, d.reason) for d in part.dead_letters] == [
        (0, "model_mismatch"), (2, "duplicate_label")]
    assert [r.item[1:3] for r in outcomes(part)] == [[1.0, 1.0]]  # the second label won
    assert part.counts["matched"] == {"m|1": 1}
    assert part.pending() == 0


def test_labels_waiting_for_one_prediction_are_bounded_in_number_and_bytes() -> None:
    # A client retrying a label must not grow one entry without bound: it is rewritten
    # (and sent to the changelog) with every label, as one message.
    part, feed = new()
    for i in range(10):
        feed("labels", label("a", 101.0 + i, value=1, model="m"))
    assert [(d.offset, d.reason) for d in part.dead_letters] == [
        (8, "duplicate_label"), (9, "duplicate_label")]  # at once: 8 wait
    feed("predictions", prediction("a", 100.0))
    assert [r.item[1:3] for r in outcomes(part)] == [[1.0, 1.0]]  # the first one won
    assert [d.offset for d in part.dead_letters] == [8, 9, *range(1, 8)]
    assert part.counts["dead"] == {"labels|duplicate_label": 9}

    # Two labels of 600 kB (JSON may hold any whitespace): together past 1 MiB.
    part, feed = new()
    padded = [label("b", 101.0 + i, model="m").replace(b",", b"," + b" " * 600_000, 1)
              for i in range(3)]
    for raw in padded:
        feed("labels", raw)
    assert [(d.offset, d.reason) for d in part.dead_letters] == [
        (1, "duplicate_label"), (2, "duplicate_label")]
    assert max(len(v) for v in part.changed.values() if v) < 700_000  # one label's entry


def test_waiting_labels_all_expire_as_unmatched() -> None:
    part, feed = new()
    feed("labels", label("a", 100.0, value=0, model="other"))
    feed("labels", label("a", 101.0, value=1, model="m"))
    feed("predictions", prediction("b", 100.0 + TTL + 10))  # predictions move on
    part.expire()
    assert [(d.offset, d.reason) for d in part.dead_letters] == [
        (0, "unmatched_label"), (1, "unmatched_label")]


# Fixed (models/join.py _entry_bytes): orjson.dumps hands back a 4 KiB allocation however
# short its output, so each pending prediction held 4 KiB of memory (measured by
# `python -m streams bench`); entries are now copied into bytes of their own size.
def test_a_pending_prediction_costs_hundreds_of_bytes_of_memory_not_kilobytes() -> None:
    import tracemalloc

    raws = [prediction(f"id-{i:06d}", 100.0, scores={"0": 0.2, "1": 0.8}) for i in range(5000)]
    part = JoinPartition({}, partition=0, ttl=TTL)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset, raw in enumerate(raws):
            part.absorb("predictions", raw, offset, 100.0)
        part.drain()
        per_pending = (tracemalloc.get_traced_memory()[0] - before) / len(raws)
    finally:
        tracemalloc.stop()
    assert part.pending() == 5000
    assert per_pending < 1000, per_pending  # was 4,700 bytes


def test_records_reach_the_model_stage_as_the_join_made_them() -> None:
    """encode_records / decode_records: a prediction travels as its event's own bytes
    (whitespace, unknown fields and all), an outcome as its item; both come back equal."""
    part, feed = new()
    spaced = (b' {"id": "b", "model": "m", "version": "2", "ts": 101.5, "extra": [1, {"y": 2}],'
              b' "features": {"x": 0.30000000000000004, "c": "DE", "n": null, "f": false},'
              b' "prediction": "yes"}\n')
    feed("predictions", prediction("a", 100.0, scores={"0": 0.25, "1": 0.75}))
    feed("predictions", spaced)
    feed("labels", label("a", 130.0, value=0))
    sent = part.drain().records
    assert [r.kind for r in sent] == ["p", "p", "o"] and sent[1].raw == spaced
    [(model, message)] = encode_records(sent)
    assert model == "m"
    assert spaced in message and message.count(b'["e",') == 2
    received = list(decode_records("m", message))
    assert received == sent
    assert received[1].item == [101.5, {"x": 0.30000000000000004, "c": "DE", "n": None,
                                        "f": False}, "yes", None]


def test_a_model_s_records_split_into_messages_under_the_limit_in_order() -> None:
    part, feed = new()
    for i in range(300):
        feed("predictions", prediction(f"id-{i}", 100.0 + i, model="big" if i % 3 else "m"))
    for i in range(0, 300, 2):
        feed("labels", label(f"id-{i}", 200.0 + i))
    sent = part.drain().records
    for runs in (False, True):  # outcomes one each, or as runs (100 and 50 of them)
        messages = encode_records(sent, limit=4_000, runs=runs)
        assert all(len(raw) <= 4_000 for _, raw in messages)
        assert [m for m, _ in messages].count("big") > 5
        assert [m for m, _ in messages].count("m") > 3
        for model in ("big", "m"):
            received = [r for m, raw in messages if m == model for item in decode_records(m, raw)
                        for r in (outcome_records(m, item) if isinstance(item, OutcomeRun)
                                  else [item])]
            assert received == [r for r in sent if r.model == model]
    alone = encode_records(sent[:1], limit=10)  # a record over the limit still goes, alone
    assert [list(decode_records(m, raw)) for m, raw in alone] == [sent[:1]]


def heap_items(part: JoinPartition) -> dict[str, int]:
    return {kind: len(heap) for kind, heap in part._heaps.items()}


def test_a_matched_prediction_hands_its_expiry_item_to_its_marker() -> None:
    """A marker made when a label meets its pending prediction keeps no heap item of its
    own: the prediction's (same ts) comes due first and is handed to the marker's rule,
    which removes the marker at once or keeps the item with the markers."""
    part, feed = new()
    feed("predictions", prediction("a", 100.0))
    feed("labels", label("a", 110.0))
    assert heap_items(part) == {"P": 1, "L": 0, "D": 0}
    feed("labels", label("b", 1_000.0))  # the labels moved on, the predictions did not
    part.expire()
    assert heap_items(part) == {"P": 0, "L": 1, "D": 1}  # the item waits with the markers
    assert orjson.loads(part.store["a"])[0] == "D"
    feed("predictions", prediction("c", 1_000.0))
    part.expire()
    assert "a" not in part.store and heap_items(part) == {"P": 1, "L": 1, "D": 0}
    feed("predictions", prediction("d", 2_000.0))
    feed("labels", label("d", 2_000.0))  # carried again, and due at once below
    feed("predictions", prediction("e", 3_000.0))
    feed("labels", label("f", 3_000.0))
    part.expire()
    assert sorted(part.store) == ["e", "f"]
    assert heap_items(part) == {"P": 1, "L": 1, "D": 0}


def test_markers_that_carry_their_predictions_items_join_as_markers_with_their_own() -> None:
    """Joined side by side with a partition whose markers push an item of their own (as
    before), a seeded stream with duplicates gives the same records, dead letters and
    store batch by batch, with one heap item fewer per marker while it is kept."""
    rng = random.Random(8)
    events = []
    for event in sim_events(seed=9, n=1500):
        events += [event, event] if rng.random() < 0.05 else [event]
    carried, carried_feed = new()
    pushed, pushed_feed = new()
    pushed._carry = False
    most = [0, 0]  # heap items at most, after a batch
    for batch in batches(events):
        for topic, raw, ts in batch:
            carried_feed(topic, raw, ts)
            pushed_feed(topic, raw, ts)
        carried.expire()
        pushed.expire()
        assert carried.drain()[:3] == pushed.drain()[:3]
        # The same entries; a marker now goes in the predictions' pass, so the write-ahead
        # entry may list the batch's deletions in another order.
        wal = wal_key(0)
        assert orjson.loads(carried.store.pop(wal)) == orjson.loads(pushed.store.pop(wal))
        assert carried.store == pushed.store
        most = [max(a, sum(heap_items(part).values()))
                for a, part in zip(most, (carried, pushed), strict=True)]
    assert sum(carried.counts["matched"].values()) == 842  # pinned for seed 9
    assert store_kinds(carried.store) == {"P": 0, "L": 324, "D": 335}
    assert heap_items(carried) == {"P": 0, "L": 324, "D": 335}  # one per entry
    assert heap_items(pushed) == heap_items(carried)  # all due: the same at the end
    assert most == [745, 902]  # but the TTL long, a matched prediction's item or two


# Fixed (models/join.py, models.events.regression_number): a regression's numbers were
# any finite float, but river's RMSE squares the error with **, which raises
# OverflowError past about 1.34e154; the model stage then dead-lettered the whole records
# message, every valid outcome in it too.
def test_regression_model_dead_letters_numbers_whose_error_could_not_be_squared() -> None:
    part = JoinPartition({}, partition=0, ttl=TTL, regression=lambda model: model == "price")
    feed = Feed(part)
    feed("predictions", prediction("a", 100.0, model="price", prediction=2e153))
    feed("predictions", prediction("b", 100.0, model="price", prediction=-1e153))
    feed("labels", label("b", 101.0, value=1.5e153))  # after its prediction
    feed("labels", label("c", 102.0, value=-2e153))  # before its prediction
    feed("predictions", prediction("c", 103.0, model="price", prediction=3.0))
    feed("labels", label("b", 104.0, value=1e153))  # the largest number joins
    assert [(d.topic, d.offset, d.reason) for d in part.dead_letters] == [
        ("predictions", 0, "invalid_prediction"),
        ("labels", 0, "invalid_label"),
        ("labels", 1, "invalid_label"),
    ]
    assert [r.item[1:3] for r in outcomes(part)] == [[-1e153, 1e153]]


# Fixed (models/join.py, JoinPartition._absorb): a record with no value (a tombstone) was
# dead-lettered with an empty value, which a consumer cannot tell from an empty message.
def test_a_record_without_a_value_is_dead_lettered_without_one() -> None:
    part = JoinPartition({}, partition=0, ttl=TTL)
    part.absorb_many("predictions", [InputRecord(0, 1_000, b"k", None),
                                     InputRecord(1, 1_000, b"e", b"")])
    assert [(d.offset, d.reason, d.raw, d.key) for d in part.dead_letters] == [
        (0, "invalid_json", None, b"k"), (1, "invalid_json", b"", b"e")]
