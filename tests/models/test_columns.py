"""Runs of predictions as columns: exact round trips, and a model stage that absorbs them
exactly as it absorbs one record per prediction."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest

from models import codec
from models.columns import Categories, FeatureColumns, OutcomeRun, PredictionRun
from models.errors import StateError
from models.join import (
    RUN_MIN,
    JoinPartition,
    ModelRecord,
    decode_records,
    encode_records,
    outcome_records,
    run_records,
)
from models.monitor import ModelState
from models.policy import PolicyBook, PolicyConfig
from models.simulation import WideScenario, simulate_wide


def typed(rows: list[dict[str, Any]]) -> list[list[tuple[str, type, Any]]]:
    """Rows as (name, type, value): 1 == 1.0 == True in Python, not here."""
    return [[(k, type(v), v) for k, v in row.items()] for row in rows]


def test_columns_give_back_every_value_with_its_type() -> None:
    rows = [
        {"f": 0.30000000000000004, "s": "DE", "i": 1, "m": 1.0, "b": True, "n": None,
         "u": "\u00e9\u4e2d\U0001f600"},
        {"f": -0.0, "s": "FR", "i": 2**62, "m": 2, "b": False, "n": 3.5, "u": ""},
        {"f": 5e-324, "s": "DE", "i": -7, "m": "x", "b": True, "n": None, "u": "a\"b\\"},
        {"f": 1.7976931348623157e308, "s": "", "i": 0, "m": None, "b": False, "n": 0,
         "u": "\x00"},
    ]
    columns = FeatureColumns.from_rows(rows)
    assert columns is not None
    assert isinstance(columns.columns["f"], np.ndarray)
    assert isinstance(columns.columns["s"], Categories)
    assert columns.columns["s"].values == ["DE", "FR", ""]
    assert all(isinstance(columns.columns[k], list) for k in "imbnu" if k != "u")
    assert isinstance(columns.columns["u"], Categories)
    back = FeatureColumns.decode(orjson.loads(orjson.dumps(columns.encode())), len(rows))
    assert typed(back.rows()) == typed(rows)
    assert math.copysign(1.0, back.rows()[1]["f"]) == -1.0  # -0.0 keeps its sign
    assert typed(back.rows(1, 3)) == typed(rows[1:3])
    assert typed(back.slice(2, 4).rows()) == typed(rows[2:])


def test_rows_with_other_feature_names_make_no_columns() -> None:
    assert FeatureColumns.from_rows([{"a": 1.0, "b": 2.0}, {"a": 1.0, "c": 2.0}]) is None
    assert FeatureColumns.from_rows([{"a": 1.0}, {"a": 1.0, "b": 2.0}]) is None
    assert FeatureColumns.from_rows([{"a": 1.0}, {"b": 2.0}]) is None
    assert FeatureColumns.from_rows([]) is None
    same = FeatureColumns.from_rows([{"a": 1.0, "b": "x"}, {"b": "y", "a": 2.0}])  # any order
    assert same is not None and same.rows() == [{"a": 1.0, "b": "x"}, {"a": 2.0, "b": "y"}]
    empty = FeatureColumns.from_rows([{}, {}])
    assert empty is not None and empty.rows() == [{}, {}]


@pytest.mark.parametrize(("entry", "message"), [
    (["c", "1", "p0", [1, 2], [1.0], ["a", "b"], [None, None], {}], "unequal length"),
    (["c", "1", "p0", [2, 2], [1.0, 2.0], ["a", "b"], [None, None], {}], "out of order"),
    (["c", "1", "p0", [1, 2], [1.0, 2.0], ["a", "b"], [None, None],
      {"x": ["f", "AAAAAAAA4D8="]}], "column 'x' has 1 values, not 2"),
    (["c", "1", "p0", [1, 2], [1.0, 2.0], ["a", "b"], [None, None],
      {"c": ["s", ["a"], "AAAAAAEAAAA="]}], "column 'c' has codes out of range"),
    (["c", "1", "p0", [1, 2], [1.0, 2.0], ["a", "b"], [None, None],
      {"j": ["j", [1]]}], "column 'j' is not a column of 2"),
    (["c", "1", "p0", [1, 2]], "a run entry has 4 fields"),
    (["oc", "1", "o0", 3, [0, 1], [1.0, 2.0], [1, 0], [1, 1], [None, None], [None, None],
      [0.5]], "outcome run of o0 has columns of unequal length"),
    (["oc", "1", "o0", 3, [1, 1], [1.0, 2.0], [1, 0], [1, 1], [None, None], [None, None],
      [0.5, 0.5]], "outcome run of o0 has positions out of order"),
    (["oc", "1", "o0", 3, [0, 1]], "an outcome run entry has 5 fields"),
    (["c", "1", "p0", [1, 2], [1.0, 2.0], ["a", "b"], [None, None],
      {"x": ["f", "not base64!"]}], "column 'x' is not base64 of float64 values"),
])
def test_a_run_that_does_not_hold_is_refused_naming_what(entry: list[Any],
                                                          message: str) -> None:
    with pytest.raises(StateError, match=message):
        list(decode_records("m", orjson.dumps([entry])))


def join_records(events: list[dict[str, Any]], partition: int = 0) -> list[ModelRecord]:
    part = JoinPartition({}, partition=partition, ttl=600.0)
    for offset, event in enumerate(events):
        part.absorb("predictions", orjson.dumps(event), offset, event["ts"])
    return part.drain().records


def wide_events(n: int, **scenario: Any) -> list[dict[str, Any]]:
    return [ev.value for ev in simulate_wide(WideScenario(n=n, **scenario))]


def test_a_join_batch_travels_as_runs_and_comes_back_as_its_records() -> None:
    events = wide_events(200, seed=3)
    for event in events[50:60]:  # a run of another version, too short for columns
        event["version"] = "2"
    for event in events[120:140]:  # no "c0": a run of its own
        del event["features"]["c0"]
    sent = join_records(events)
    [(model, message)] = encode_records(sent)
    entries = orjson.loads(message)
    assert [(e[0], len(e[3]) if e[0] == "c" else 1) for e in entries] == (
        [("c", 50)] + [("e", 1)] * 10 + [("c", 60), ("c", 20), ("c", 60)])
    received = [record for item in decode_records(model, message)
                for record in (run_records(model, item) if isinstance(item, PredictionRun)
                               else [item])]
    assert received == sent  # the event's bytes (compare=False) aside
    assert typed([r.item[1] for r in received]) == typed([r.item[1] for r in sent])
    assert len(message) < 0.5 * sum(len(r.raw or b"") for r in sent)


def test_runs_are_cut_to_keep_messages_under_the_limit() -> None:
    sent = join_records(wide_events(2_000, seed=4))
    messages = encode_records(sent, limit=60_000)
    assert len(messages) >= 10 and all(len(raw) <= 60_000 for _, raw in messages)
    items = [item for _, raw in messages for item in decode_records("wide", raw)]
    runs = [item for item in items if isinstance(item, PredictionRun)]
    assert all(len(run) >= RUN_MIN for run in runs)
    assert sum(map(len, runs)) >= 1_900  # a span's last few may go one each
    assert [o for item in items for o in (
        item.offsets if isinstance(item, PredictionRun) else [item.position[0]])] == list(
        range(2_000))


def test_optional_features_cost_no_rescans() -> None:
    """Spans are cut where the feature names change: a feature in every second
    prediction makes no run and no repeated attempt at one (it had made the join's
    encoding quadratic in the batch)."""
    events = wide_events(3_000, seed=6)
    for event in events[::2]:
        event["features"]["optional"] = 1.0
    sent = join_records(events)
    calls = 0
    real = FeatureColumns.from_rows

    def counted(rows: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(rows)

    FeatureColumns.from_rows = counted  # type: ignore[method-assign]
    try:
        messages = encode_records(sent)
    finally:
        FeatureColumns.from_rows = real  # type: ignore[method-assign]
    assert calls == 0
    assert [r for _, raw in messages for r in decode_records("wide", raw)] == sent
    # As many features but other names, every 50: one attempt over each part of the
    # span cut by size (about 400 predictions), then one per 50 (not per prediction).
    events = wide_events(1_000, seed=6)
    for i, event in enumerate(events):
        if i // 50 % 2:
            event["features"]["renamed"] = event["features"].pop("n0")
    sent = join_records(events)
    calls = 0
    FeatureColumns.from_rows = counted  # type: ignore[method-assign]
    try:
        messages = encode_records(sent)
    finally:
        FeatureColumns.from_rows = real  # type: ignore[method-assign]
    items = [item for _, raw in messages for item in decode_records("wide", raw)]
    runs = [item for item in items if isinstance(item, PredictionRun)]
    assert [r for item in items for r in (
        run_records("wide", item) if isinstance(item, PredictionRun) else [item])] == sent
    assert sum(map(len, runs)) > 950
    assert all(run.offsets[0] // 50 == run.offsets[-1] // 50 for run in runs)
    assert calls <= 3 + 23

    events = wide_events(3_000, seed=6)
    for event in events[1_000:2_000]:
        event["features"]["optional"] = 1.0
    items = [item for _, raw in encode_records(join_records(events))
             for item in decode_records("wide", raw)]
    runs = [item for item in items if isinstance(item, PredictionRun)]
    assert sum(map(len, runs)) == 3_000  # all in runs, none across a change of names
    assert all(run.offsets[0] // 1_000 == run.offsets[-1] // 1_000 for run in runs)


def absorbed(state: ModelState) -> tuple[bytes, dict[str, Any]]:
    return codec.dumps(state.versions), dict(state.positions)


def test_runs_are_absorbed_exactly_as_one_record_each_replays_included() -> None:
    """Feature drift (a numeric and a categorical shift), nulls and a missing feature:
    runs through encode/decode give the events, their order and the state of one absorb
    per record; re-sent messages, whole or from the middle of a run, add nothing."""
    events = wide_events(30_000, seed=5, shift_feature="n2", shift_at=16_000)
    for i in range(16_000, 30_000):  # a categorical drift too
        c1 = events[i]["features"]["c1"]
        events[i]["features"]["c1"] = {"a": "c", "c": "a"}.get(c1, c1)
    for event in events[12_000:12_400]:
        event["features"]["n5"] = None  # nulls: a column of values
    for event in events[14_000:14_100]:
        del event["features"]["c3"]  # absent: missing, and runs without it
    for event in events[20_000:20_100]:
        event["features"]["new"] = 1.0  # untracked
    records = join_records(events)

    one = ModelState("wide", PolicyBook())
    bulk = ModelState("wide", PolicyBook())
    expected: list[dict[str, Any]] = []
    got: list[dict[str, Any]] = []
    runs = 0
    for start in range(0, len(records), 1_700):
        chunk = records[start:start + 1_700]
        expected += [event for r in chunk if (event := one.absorb(r)) is not None]
        for _, raw in encode_records(chunk, limit=200_000):
            items = list(decode_records("wide", raw))
            runs += sum(isinstance(item, PredictionRun) for item in items)
            got += bulk.absorb_many(items)
        assert absorbed(bulk) == absorbed(one)  # open windows' counts and all
        replay = encode_records(records[max(0, start - 900):start + 1_700], limit=200_000)
        before = bulk.replays_skipped
        for _, raw in replay:  # a replay from the middle of an earlier run: nothing new
            assert bulk.absorb_many(decode_records("wide", raw)) == []
        assert bulk.replays_skipped - before == len(records[max(0, start - 900):start + 1_700])
        assert absorbed(bulk) == absorbed(one)
    assert runs > 40
    reasons = [(r["kind"], r.get("feature")) for event in expected for r in event["reasons"]]
    assert ("feature_drift", "n2") in reasons and ("feature_drift", "c1") in reasons
    assert got == expected
    assert bulk.versions["1"].data.untracked == one.versions["1"].data.untracked == 100


def joined_batches(n: int, seed: int, batch: int = 1_000) -> list[list[ModelRecord]]:
    """The records of a join fed ``n`` predictions, each followed 50 predictions later by
    its label, as the worker sends them: per drained batch, the predictions, then the
    outcomes. The error rate steps from 10% to 35% halfway; every third prediction has
    scores, every twentieth is of version "2"."""
    import random

    rng = random.Random(seed)
    events = wide_events(n, seed=seed)
    part = JoinPartition({}, partition=2, ttl=1e9)
    inputs: list[tuple[str, dict[str, Any]]] = []
    for i, event in enumerate(events):
        if i % 3 == 0:
            p = rng.random()
            event["scores"] = {"0": 1 - p, "1": p}
        if i % 20 == 0:
            event["version"] = "2"
        inputs.append(("predictions", event))
        if i >= 50:
            before = events[i - 50]
            wrong = rng.random() < (0.1 if i < n // 2 else 0.35)
            inputs.append(("labels", {"id": before["id"], "ts": before["ts"] + 30.0,
                                      "label": 1 - before["prediction"] if wrong
                                      else before["prediction"]}))
    offsets = {"predictions": 0, "labels": 0}
    batches = []
    for start in range(0, len(inputs), batch):
        for topic, event in inputs[start:start + batch]:
            part.absorb(topic, orjson.dumps(event), offsets[topic], event["ts"])
            offsets[topic] += 1
        flush = part.drain()
        batches.append(flush.early()[0] + flush.outbox()[0])
    return batches


def by_version(state: ModelState) -> tuple[dict[str, bytes], dict[str, Any]]:
    """:func:`absorbed`, a pickle per version: the versions share feature names decoded by
    orjson (one str object per name), not those the join decoded, a reference that a
    pickle of them all would write differently."""
    return {v: codec.dumps(m) for v, m in state.versions.items()}, dict(state.positions)


def test_outcome_runs_are_absorbed_exactly_as_one_record_each_replays_included() -> None:
    """Outcomes through encode/decode as runs: the state, the retraining events (concept
    drift and degraded accuracy) and their order of one absorb per record; a message sent
    again, whole or from the middle of a run, adds nothing."""
    policies = PolicyBook(PolicyConfig(window=500, min_outcomes=500, cooldown_seconds=0.0))
    batches = joined_batches(12_000, seed=9)
    one, bulk = ModelState("wide", policies), ModelState("wide", policies)
    expected: list[dict[str, Any]] = []
    got: list[dict[str, Any]] = []
    runs = 0
    previous: list[ModelRecord] = []
    for records in batches:
        expected += [event for r in records if (event := one.absorb(r)) is not None]
        for _, raw in encode_records(records, limit=20_000):
            items = list(decode_records("wide", raw))
            runs += sum(isinstance(item, OutcomeRun) for item in items)
            got += bulk.absorb_many(items)
        assert by_version(bulk) == by_version(one)
        replayed = previous[len(previous) // 2:] + records
        before = bulk.replays_skipped
        for _, raw in encode_records(replayed, limit=20_000):
            assert bulk.absorb_many(decode_records("wide", raw)) == []
        assert bulk.replays_skipped - before == len(replayed)
        assert by_version(bulk) == by_version(one)
        previous = records
    assert runs > 30
    kinds = [r["kind"] for event in expected for r in event["reasons"]]
    assert "concept_drift" in kinds and "performance" in kinds
    assert got == expected
    assert bulk.versions["1"].outcomes_seen + bulk.versions["2"].outcomes_seen == 12_000 - 50


def test_an_outcome_run_keeps_a_regression_model_s_rejects_as_one_record_each() -> None:
    policies = PolicyBook(PolicyConfig(task="regression", window=50, min_outcomes=10))
    values: list[Any] = [0.5, 1.25, 2, "x", None, 3.0, True, 4.5]
    records = [ModelRecord("o", "r", "1", "o0", (7, i), [100.0 + i, values[i % 8],
                                                         values[(i * 3) % 8], None, None, 1.0])
               for i in range(64)]
    one, bulk = ModelState("r", policies), ModelState("r", policies)
    for r in records:
        one.absorb(r)
    [(_, raw)] = encode_records(records)
    assert [entry[0] for entry in orjson.loads(raw)] == ["oc"]
    bulk.absorb_many(decode_records("r", raw))
    assert bulk.rejected == one.rejected > 0 and bulk.positions == one.positions == {"o0": (7, 63)}
    assert absorbed(bulk) == absorbed(one)
    bulk.absorb_many(decode_records("r", raw))  # sent again: every outcome is a replay
    assert bulk.replays_skipped == 64 and absorbed(bulk) == absorbed(one)


def test_an_outcome_run_too_large_for_a_message_is_halved_until_it_fits() -> None:
    records = [ModelRecord("o", "m", "1", "o0", (3, i), [1.0, "y" * 300, "n" * 300, None,
                                                        None, 0.0]) for i in range(100)]
    messages = encode_records(records, limit=10_000)
    assert len(messages) >= 7 and all(len(raw) <= 10_000 for _, raw in messages)
    received = [r for m, raw in messages for item in decode_records(m, raw)
                for r in outcome_records(m, item)]
    assert received == records
