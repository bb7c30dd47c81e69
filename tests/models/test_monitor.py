"""ModelState / VersionMonitor: idempotent absorption of join records per model."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import orjson
import pandas as pd
import pytest

from models import codec
from models.join import JoinPartition, ModelRecord
from models.monitor import DELAY_BUCKETS, ModelState
from models.policy import PolicyBook, PolicyConfig
from models.reference import build_profile
from models.simulation import Scenario, simulate


def p_rec(offset: int, version: str = "1", source: str = "p0", ts: float = 10.0,
          confidence: float | None = 0.9) -> ModelRecord:
    return ModelRecord("p", "m", version, source, (offset, 0), [ts, {"x": 1}, "1", confidence])


def o_rec(offset: int, prediction: object = "1", label: object = "1", version: str = "1",
          source: str = "l0", sub: int = 1, ts: float = 20.0, delay: float = 2.5) -> ModelRecord:
    return ModelRecord("o", "m", version, source, (offset, sub),
                       [ts, prediction, label, 0.9, 0.9, delay])


def test_replayed_positions_are_skipped() -> None:
    state = ModelState("m", PolicyBook())
    assert state.absorb(o_rec(5)) is None
    state.absorb(o_rec(5))  # the same record again
    state.absorb(o_rec(3))  # an older one
    v = state.versions["1"]
    assert (v.outcomes_seen, state.replays_skipped) == (1, 2)
    assert state.positions == {"l0": (5, 1)}
    state.absorb(o_rec(6))
    assert (v.outcomes_seen, state.replays_skipped) == (2, 2)


def test_positions_are_kept_per_source() -> None:
    state = ModelState("m", PolicyBook())
    state.absorb(o_rec(9, source="l0"))
    state.absorb(o_rec(2, source="l1"))  # another partition: its own offsets
    state.absorb(p_rec(2, source="p0"))
    assert state.replays_skipped == 0
    assert state.positions == {"l0": (9, 1), "l1": (2, 1), "p0": (2, 0)}


def test_prediction_and_its_early_label_share_an_offset_and_both_count() -> None:
    state = ModelState("m", PolicyBook())
    state.absorb(p_rec(4, source="p0"))
    state.absorb(o_rec(4, source="p0", sub=1))  # label arrived first: outcome at (4, 1)
    state.absorb(p_rec(4, source="p0"))  # replay of (4, 0)
    v = state.versions["1"]
    assert (v.predictions_seen, v.outcomes_seen, state.replays_skipped) == (1, 1, 1)


def test_positions_from_json_lists_compare_like_tuples() -> None:
    # The worker sends records through Kafka as JSON: the position arrives as a list.
    state = ModelState("m", PolicyBook())
    state.absorb(ModelRecord("o", "m", "1", "l0", [5, 1], [1.0, "1", "1", None, None, 0.0]))  # type: ignore[arg-type]
    state.absorb(ModelRecord("o", "m", "1", "l0", [5, 1], [1.0, "1", "1", None, None, 0.0]))  # type: ignore[arg-type]
    assert state.replays_skipped == 1


def test_versions_are_monitored_apart() -> None:
    state = ModelState("m", PolicyBook())
    state.absorb(p_rec(0, version="1"))
    state.absorb(p_rec(1, version="2"))
    state.absorb(o_rec(0, version="2", prediction="1", label="0"))
    assert sorted(state.versions) == ["1", "2"]
    one, two = state.versions["1"], state.versions["2"]
    assert (one.predictions_seen, one.outcomes_seen) == (1, 0)
    assert (two.predictions_seen, two.outcomes_seen, two.correct) == (1, 1, 0)


def test_classes_are_compared_by_class_key() -> None:
    state = ModelState("m", PolicyBook())
    state.absorb(o_rec(0, prediction=1.0, label="1"))
    state.absorb(o_rec(1, prediction=True, label="true"))
    state.absorb(o_rec(2, prediction=0.0, label=1.0))
    v = state.versions["1"]
    assert (v.outcomes_seen, v.correct) == (3, 2)
    assert v.performance.accuracy == pytest.approx(2 / 3, abs=1e-12)


def test_prediction_counts_confidence_and_latest_event_time() -> None:
    state = ModelState("m", PolicyBook())
    state.absorb(p_rec(0, ts=30.0, confidence=0.8))
    state.absorb(p_rec(1, ts=10.0, confidence=None))  # no scores: not in the estimate
    state.absorb(p_rec(2, ts=20.0, confidence=0.6))
    v = state.versions["1"]
    assert (v.predictions_seen, v.estimate.n, v.last_ts) == (3, 2, 30.0)
    assert v.estimate.get() == pytest.approx(0.7, abs=1e-12)


def test_label_delay_histogram_buckets_are_upper_bounds() -> None:
    state = ModelState("m", PolicyBook())
    delays = [0.5, 1.0, 1.5, 30.0, 30.01, 604800.0, 604800.5]
    for offset, delay in enumerate(delays):
        state.absorb(o_rec(offset, delay=delay))
    v = state.versions["1"]
    expected = [0] * (len(DELAY_BUCKETS) + 1)
    for bucket in (0, 0, 1, 3, 4, 10, 11):  # 11 is +Inf
        expected[bucket] += 1
    assert v.delay_counts == expected
    assert v.delay_sum == pytest.approx(sum(delays), abs=1e-9)


def test_model_policy_comes_from_the_policy_book() -> None:
    book = PolicyBook.from_toml('[models.m]\nwindow = 50\ndetector = "DDM"')
    state = ModelState("m", book)
    state.absorb(o_rec(0))
    v = state.versions["1"]
    assert (state.config.window, v.performance.window, v.performance.detector_name) == (
        50, 50, "DDM")
    assert (v.policy.model, v.policy.version) == ("m", "1")


def test_accuracy_reaches_the_policy_only_once_the_window_is_full() -> None:
    state = ModelState("m", PolicyBook(PolicyConfig(window=3, min_outcomes=1)))
    for offset in range(2):
        state.absorb(o_rec(offset))
    assert state.versions["1"].policy.reference is None
    state.absorb(o_rec(2, label="0"))
    assert state.versions["1"].policy.reference == pytest.approx(2 / 3, abs=1e-12)


# -- a policy changed under a monitored model ---------------------------------------------


def _degrading(state: ModelState, book: PolicyBook | None) -> list[dict[str, object]]:
    """10 right outcomes (the reference, 1.0), the policy changed to ``book`` (None: not),
    then 10 more with the 13th and 16th wrong: the rolling accuracy falls to 0.8."""
    fired = [e for k in range(10) if (e := state.absorb(o_rec(k)))]
    if book is not None:
        state.reconfigure(book)
    fired += [e for k in range(10, 20) if (e := state.absorb(o_rec(k, label="0" if k in (12, 15)
                                                                  else "1")))]
    return fired


def test_a_changed_threshold_applies_to_the_versions_already_monitored() -> None:
    before = PolicyBook(PolicyConfig(window=10, min_outcomes=10, accuracy_drop=0.5))
    after = PolicyBook(PolicyConfig(window=10, min_outcomes=10, accuracy_drop=0.1))
    assert _degrading(ModelState("m", before), None) == []  # 0.8 is above 0.5 of 1.0
    state = ModelState("m", before)
    [event] = _degrading(state, after)
    [reason] = event["reasons"]  # type: ignore[index]
    assert (event["id"], reason) == ("m:1:000001", {
        "kind": "performance", "metric": "accuracy", "before": 1.0, "after": 0.8,
        "threshold": 0.9})
    assert event["evidence"]["outcomes_seen"] == 16  # type: ignore[index]
    assert state.config == after.default
    assert state.reconfigure(after) == []  # once adopted, nothing changes


def test_a_changed_shape_applies_to_versions_first_seen_after_the_change() -> None:
    """The window, detector and task a version was built with stay its own; its other
    keys follow the file. A version first seen afterwards is built under the new one."""
    state = ModelState("m", PolicyBook(PolicyConfig(window=10, min_outcomes=10)))
    state.absorb(o_rec(0))
    new = PolicyConfig(window=20, detector="DDM", min_outcomes=5, cooldown_seconds=60.0)
    assert state.reconfigure(PolicyBook(models={"m": new})) == [
        "window", "detector", "min_outcomes", "cooldown_seconds"]
    v1 = state.versions["1"]
    assert (v1.performance.window, v1.performance.detector_name) == (10, "ADWIN")
    assert dataclasses.astuple(v1.policy.config) == dataclasses.astuple(
        dataclasses.replace(new, window=10, detector="ADWIN"))
    v2 = state.version("2")
    assert (v2.performance.window, v2.performance.detector_name) == (20, "DDM")
    assert v2.policy.config == new
    assert codec.loads(codec.dumps(state)).versions["1"].policy.config.min_outcomes == 5


def test_records_absorbed_again_after_a_crash_fire_as_before_under_a_changed_policy() -> None:
    """A worker sends a batch's retraining events before it stores the states: killed in
    between and restarted with a changed file, it absorbs that batch again. Under the
    new policy the event would not fire again, and a later one would take its id, which
    consumers drop as a duplicate; so a change applies from the records partition's end
    offset as the state is loaded, and the batch fires as before."""
    before = PolicyBook(PolicyConfig(window=10, min_outcomes=10, accuracy_drop=0.1))
    after = PolicyBook(PolicyConfig(window=10, min_outcomes=10, accuracy_drop=0.5))
    first = [o_rec(k) for k in range(10)]  # records message 0
    second = [o_rec(k, label="0" if k in (12, 15) else "1") for k in range(10, 20)]  # 1
    state = ModelState("m", before)
    state.reach(0)
    state.absorb_many(first)
    stored = codec.dumps(state)
    state.reach(1)
    [event] = state.absorb_many(second)  # sent; the worker is killed before storing

    again = codec.loads(stored)  # restarted: the records partition ends at offset 2
    assert again.reconfigure(after, at=2) == ["accuracy_drop"]
    again.reach(1)
    assert again.absorb_many(second) == [event]  # "m:1:000001" again, the same event
    assert again.versions["1"].policy.config.accuracy_drop == 0.1
    again.reach(2)
    assert again.versions["1"].policy.config.accuracy_drop == 0.5
    assert again.pending == ()
    at_once = codec.loads(stored)  # applied at once instead: the event is not fired again
    at_once.reconfigure(after)
    assert at_once.absorb_many(second) == []


def test_a_pending_policy_change_is_stored_with_the_state() -> None:
    state = ModelState("m", PolicyBook())
    assert "pending" not in vars(state)  # as in states an earlier release stored
    assert codec.loads(codec.dumps(state)).pending == ()
    change = PolicyConfig(hysteresis=0.05)
    state.reconfigure(PolicyBook(change), at=5)
    state.reconfigure(PolicyBook(), at=8)  # changed back before it applied
    assert codec.loads(codec.dumps(state)).pending == ((5, change), (8, PolicyConfig()))
    state.reach(6)
    assert (state.config, state.pending) == (change, ((8, PolicyConfig()),))


def test_a_version_a_profile_made_is_built_under_the_change_it_is_first_seen_under() -> None:
    """A published profile makes its version before any of its records: with a change
    pending, that version is built anew under it as the change applies, with the
    profile, since its first record comes under it."""
    frame = pd.DataFrame({"x": [float(i) for i in range(100)],
                          "pred": ["a", "b"] * 50, "label": ["a"] * 100})
    profile = build_profile(frame, "m", "2", prediction="pred", label="label")
    state = ModelState("m", PolicyBook(PolicyConfig(window=10)))
    state.absorb(o_rec(0))  # version 1 has seen an outcome
    new = PolicyConfig(window=50, detector="DDM", accuracy_drop=0.3)
    state.reconfigure(PolicyBook(new), at=5)
    assert state.use_reference(profile) is True
    assert state.versions["2"].performance.window == 10  # made under the policy before
    state.reach(5)
    v1, v2 = state.versions["1"], state.versions["2"]
    assert (v1.performance.window, v1.policy.config.accuracy_drop) == (10, 0.3)
    assert (v2.performance.window, v2.performance.detector_name) == (50, "DDM")
    assert v2.policy.config == new
    assert (v2.data.reference, v2.policy.reference) == (profile, 0.5)
    assert state.use_reference(profile) is False  # still the one in use

    # Republished before the version's first record: queued for its next window, with
    # its baseline at once; so it stays, built anew under a further change.
    better = build_profile(frame.assign(pred=["a", "a", "a", "b"] * 25), "m", "2",
                           prediction="pred", label="label")
    assert state.use_reference(better) is True
    state.reconfigure(PolicyBook(dataclasses.replace(new, window=60)), at=9)
    state.reach(9)
    v2 = state.versions["2"]
    assert (v2.performance.window, v2.data.reference, v2.data.queued) == (60, profile, better)
    assert v2.policy.reference == 0.75
    assert state.use_reference(better) is False


def test_a_version_whose_outcomes_were_all_rejected_keeps_its_task() -> None:
    """A regression version whose outcomes were all skipped (not numbers) has seen none
    yet, but its records came before the change: it is not built anew."""
    state = ModelState("m", PolicyBook(PolicyConfig(task="regression")))
    state.absorb(o_rec(0, prediction="a", label="b"))
    assert (state.rejected, state.versions["1"].outcomes_seen) == (1, 0)
    state.reconfigure(PolicyBook(PolicyConfig(task="classification")), at=3)
    state.reach(3)
    assert state.versions["1"].performance.task == "regression"


def test_a_version_built_with_detector_params_a_file_may_no_longer_hold_runs_on() -> None:
    """An earlier release took ADWIN's delta 0 (a detector that never fires); a policy file
    is now refused for it, but a version stored with it keeps it through later changes of
    the file: the change applies, and the model stage does not stop at the version."""
    state = ModelState("m", PolicyBook(PolicyConfig(detector_params={"delta": 0.0})))
    state.absorb(o_rec(0))
    state = codec.loads(codec.dumps(state))
    state.reconfigure(PolicyBook(PolicyConfig(cooldown_seconds=5.0)), at=3)
    state.reach(3)
    v = state.versions["1"]
    assert (v.policy.config.cooldown_seconds, v.policy.config.detector_params) == (
        5.0, {"delta": 0.0})
    state.absorb(o_rec(4))
    assert v.outcomes_seen == 2


def test_a_regression_outcome_whose_error_could_not_be_squared_is_rejected_alone() -> None:
    """One from before the policy made the model a regression (the join dead-letters them
    since): skipped and counted, the outcomes beside it scored."""
    state = ModelState("m", PolicyBook(PolicyConfig(task="regression")))
    state.absorb(o_rec(0, prediction=2e154, label=0.0))
    state.absorb(o_rec(1, prediction=1e153, label=-1e153))
    assert state.rejected == 1
    assert state.versions["1"].performance.report()["rmse"] == 2e153


def test_a_change_made_at_once_applies_what_was_pending_first() -> None:
    state = ModelState("m", PolicyBook())
    state.absorb(o_rec(0))
    state.reconfigure(PolicyBook(PolicyConfig(accuracy_drop=0.3)), at=10)
    assert state.reconfigure(PolicyBook(PolicyConfig(accuracy_drop=0.3, hysteresis=0.05))) == [
        "hysteresis"]
    assert state.pending == ()
    assert (state.config.accuracy_drop, state.config.hysteresis) == (0.3, 0.05)
    assert state.versions["1"].policy.config == state.config


def test_a_regression_version_stays_one_when_the_file_makes_the_model_a_classifier() -> None:
    state = ModelState("m", PolicyBook(PolicyConfig(task="regression")))
    state.absorb(o_rec(0, prediction=2.0, label=3.0))
    state.reconfigure(PolicyBook(PolicyConfig(task="classification")))
    state.absorb(o_rec(1, prediction=2.0, label=4.0))  # still scored as a regression
    state.absorb(o_rec(2, prediction="a", label="b", version="2"))  # a classifier's
    assert state.rejected == 0
    assert state.versions["1"].performance.n == 2
    assert state.versions["1"].performance.report()["mae"] == pytest.approx(1.5)
    assert state.versions["2"].performance.report()["accuracy"] == 0.0


# -- the whole pipeline on a seeded stream ------------------------------------------------


def pipeline_records(scenario: Scenario) -> list[ModelRecord]:
    join = JoinPartition({}, partition=0, ttl=600.0)
    offsets = {"predictions": 0, "labels": 0}
    for event in simulate(scenario):
        join.absorb(event.topic, orjson.dumps(event.value), offsets[event.topic], event.ts)
        offsets[event.topic] += 1
    return join.drain()[0]


POLICY = "[default]\nwindow = 500\nmin_outcomes = 1000\ncooldown_seconds = 600"


def test_seeded_concept_drift_gives_one_pinned_retraining_event() -> None:
    records = pipeline_records(
        Scenario(n=12_000, seed=7, error_before=0.1, error_after=0.3, change_at=6000))
    state = ModelState("demo", PolicyBook.from_toml(POLICY))
    fired = [(i, event) for i, r in enumerate(records) if (event := state.absorb(r))]

    assert len(fired) == 1
    index, event = fired[0]
    assert index == 13166
    assert (event["id"], event["severity"], event["ts"]) == (
        "demo:1:000001", "warning", 1763800702.212)
    assert event["reasons"] == [{
        "kind": "concept_drift", "detector": "ADWIN", "metric": "error_rate",
        "before": pytest.approx(0.10336968907699821, abs=1e-12),
        "after": pytest.approx(0.14713541666666666, abs=1e-12)}]
    assert event["evidence"] == {"predictions_seen": 7023, "outcomes_seen": 6144,
                                 "window": {"start": 1763800001.225, "end": 1763800702.212}}
    assert event["metrics"]["accuracy"] == pytest.approx(0.834, abs=1e-12)
    assert event["metrics"]["accuracy_reference"] == pytest.approx(0.876, abs=1e-12)
    assert event["metrics"]["estimated_accuracy"] == pytest.approx(0.8987885660751022, abs=1e-12)

    v = state.versions["1"]
    assert (v.predictions_seen, v.outcomes_seen, v.correct) == (12_000, 10_791, 8789)
    # The accuracy drop that follows inside the cooldown is suppressed and latched.
    assert (v.detections, v.events_emitted, v.policy.suppressed) == ({"ADWIN": 1}, 1, 1)

    # Everything redelivered after a crash: nothing fires or counts twice.
    assert [state.absorb(r) for r in records] == [None] * len(records)
    assert state.replays_skipped == len(records)
    assert (v.predictions_seen, v.outcomes_seen, v.events_emitted) == (12_000, 10_791, 1)


# Fixed (models/monitor.py, ModelState.absorb): for a regression model the outcome is
# converted with float(); a label (or prediction) that is a valid event but not a number,
# e.g. {"label": "cat"} or {"label": true}, raises ValueError out of absorb, so one bad
# event stops the monitor agent instead of being skipped (DESIGN.md section 3: bad input
# never stops the worker).
@pytest.mark.parametrize("label", ["cat", "true"])
def test_regression_outcome_with_a_non_numeric_label_does_not_raise(label: str) -> None:
    state = ModelState("m", PolicyBook(PolicyConfig(task="regression")))
    state.absorb(o_rec(0, prediction=2.0, label=1.5))
    before = state.versions["1"].performance.report()
    state.absorb(o_rec(1, prediction=2.0, label=label))
    assert state.versions["1"].performance.report() == before


def test_absorb_many_equals_one_absorb_per_record() -> None:
    """Predictions go to the drift histograms in bulk, runs cut by outcomes and by
    version; the events fired, their order and the whole state equal one absorb per
    record, replays included."""
    records = pipeline_records(
        Scenario(n=12_000, seed=7, error_before=0.1, error_after=0.3, change_at=6000))
    # A second version on every third prediction (its outcomes stay on version 1).
    records = [dataclasses.replace(r, version="2") if r.kind == "p" and r.position[0] % 3 == 0
               else r for r in records]
    policy = PolicyBook.from_toml(
        "[default]\nwindow = 500\nmin_outcomes = 1000\ncooldown_seconds = 60\n"
        "reference_size = 1000\ndrift_window = 300\ndrift_threshold = 0.06\n"
        "drift_consecutive = 1")
    one = ModelState("demo", policy)
    expected = [event for r in records if (event := one.absorb(r)) is not None]
    bulk = ModelState("demo", policy)
    got, i = [], 0
    for size in itertools.cycle([1, 7, 300, 2_000, 2]):
        if i >= len(records):
            break
        got += bulk.absorb_many(records[i:i + size])
        got += bulk.absorb_many(records[max(0, i - 5):i + size])  # a replay: nothing new
        i += size
    kinds = Counter(reason["kind"] for event in expected for reason in event["reasons"])
    assert kinds == {"feature_drift": 8, "concept_drift": 1}
    assert Counter(event["version"] for event in expected) == {"1": 7, "2": 2}
    assert got == expected
    assert codec.dumps(bulk.versions) == codec.dumps(one.versions)
    assert bulk.positions == one.positions
    assert bulk.replays_skipped > 0 and one.replays_skipped == 0
