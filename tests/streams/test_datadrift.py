"""Data drift on the real broker: references, per-feature windows, retraining (issue: drift)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable

import orjson
import pandas as pd

from models.reference import build_profile
from models.simulation import WideScenario, simulate_wide
from tests.streams.harness import ROOT, produce, read_topic, run, wait_until

START = float(int(time.time()))
MV = {"model": "wide", "version": "1"}
FEATURES = [f"n{j}" for j in range(16)] + [f"c{j}" for j in range(4)]


def _records(prefix: str, scenario: WideScenario,
             start: int = 0, stop: int | None = None) -> Iterable[tuple[str, bytes, bytes]]:
    for i, ev in enumerate(simulate_wide(scenario)):
        if i >= start and (stop is None or i < stop):
            yield prefix + ev.topic, ev.key.encode(), orjson.dumps(ev.value)


def _events(kafka_broker: str, prefix: str) -> list[dict]:
    return [orjson.loads(r.value)
            for r in run(read_topic(kafka_broker, prefix + "retraining", idle=3.0))]


def test_stationary_wide_stream_has_no_drift(start_worker, kafka_broker, prefix):
    scenario = WideScenario(n=300_000, seed=3, start_ts=START)
    worker = start_worker()
    run(produce(kafka_broker, _records(prefix, scenario)))

    # The first 10,000 predictions become the reference; then a window every 2,000.
    wait_until(lambda: worker.value("driftwarden_drift_windows_total", **MV) == 145,
               600, "145 drift windows over 300,000 predictions")
    assert worker.value("driftwarden_predictions_total", **MV) == 300_000
    assert worker.value("driftwarden_reference_info", source="bootstrap", **MV) == 1
    psi = {f: worker.value("driftwarden_feature_drift", feature=f, statistic="psi", **MV)
           for f in FEATURES}
    assert all(0 < v < 0.02 for v in psi.values()), psi  # noise, five times under 0.1
    assert worker.value("driftwarden_prediction_drift", statistic="psi", **MV) < 0.02
    assert worker.value("driftwarden_retraining_events_total", **MV) == 0
    assert _events(kafka_broker, prefix) == []


def _shift_test(start_worker, kafka_broker, prefix, feature: str) -> None:
    scenario = WideScenario(n=120_000, seed=4, shift_feature=feature, shift_at=100_000,
                            start_ts=START)
    worker = start_worker()
    run(produce(kafka_broker, _records(prefix, scenario), throttle=5000))
    wait_until(lambda: worker.value("driftwarden_drift_windows_total", **MV) == 55,
               600, "55 drift windows over 120,000 predictions")
    events = _events(kafka_broker, prefix)
    assert len(events) == 1, events
    event = events[0]
    assert [(r["kind"], r["feature"], r["statistic"]) for r in event["reasons"]] == [
        ("feature_drift", feature, "psi")]
    assert event["reasons"][0]["value"] >= event["reasons"][0]["threshold"] == 0.1
    # Windows close every 2,000 predictions; two drifting ones in a row are needed.
    assert 102_000 < event["evidence"]["predictions_seen"] < 110_000
    assert worker.value("driftwarden_retraining_events_total", **MV) == 1
    others = [f for f in FEATURES if f != feature]
    assert all(worker.value("driftwarden_feature_drift", feature=f, statistic="psi", **MV) < 0.05
               for f in others)
    assert worker.value("driftwarden_feature_drift", feature=feature, statistic="psi",
                        **MV) >= 0.1


def test_numeric_mean_shift_is_feature_drift_of_that_feature(start_worker, kafka_broker,
                                                              prefix):
    _shift_test(start_worker, kafka_broker, prefix, "n3")


def test_category_swap_is_feature_drift_of_that_feature(start_worker, kafka_broker, prefix):
    _shift_test(start_worker, kafka_broker, prefix, "c1")


def test_profile_published_while_running_is_used_from_the_next_window(
        start_worker, kafka_broker, prefix, tmp_path):
    scenario = WideScenario(n=18_000, seed=5, start_ts=START)
    worker = start_worker()
    run(produce(kafka_broker, _records(prefix, scenario, 0, 12_000)))
    wait_until(lambda: worker.value("driftwarden_drift_windows_total", **MV) == 1,
               120, "the bootstrap reference and one window")
    assert worker.value("driftwarden_reference_info", source="bootstrap", **MV) == 1

    # Training data in which n0 sits one standard deviation higher than live traffic.
    training = WideScenario(n=20_000, seed=6, shift_feature="n0", shift_at=0, shift_sd=1.0)
    frame = pd.DataFrame([{**ev.value["features"], "prediction": ev.value["prediction"]}
                          for ev in simulate_wide(training)])
    path = tmp_path / "training.parquet"
    frame.to_parquet(path)
    done = subprocess.run(
        [sys.executable, "-m", "streams", "reference", "build", str(path), "--model", "wide",
         "--version", "1", "--prediction", "prediction", "--quiet"],
        cwd=ROOT, env=worker.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "published reference wide:1 (20,000 rows, 20 features" in done.stdout
    wait_until(lambda: "reference profile for wide:1 (20000 rows) received" in worker.log_text(),
               60, "the worker to receive the profile")

    # Window 2 (12,000-14,000) is still judged against the bootstrap reference; the
    # published one applies from window 3, and two drifting windows fire at 18,000.
    run(produce(kafka_broker, _records(prefix, scenario, 12_000, 18_000)))
    wait_until(lambda: worker.value("driftwarden_drift_windows_total", **MV) == 4,
               120, "four drift windows")
    assert worker.value("driftwarden_reference_info", source="data", **MV) == 1
    events = _events(kafka_broker, prefix)
    assert len(events) == 1, events
    assert [(r["kind"], r["feature"]) for r in events[0]["reasons"]] == [("feature_drift", "n0")]
    assert events[0]["evidence"]["predictions_seen"] == 18_000


def test_unreadable_profiles_are_counted_while_latest_and_dead_lettered_once_each(
        start_worker, kafka_broker, prefix):
    worker = start_worker()  # creates the topics
    refs = prefix + "references"
    invalid = {"topic": "references", "reason": "invalid_reference"}
    run(produce(kafka_broker, [(refs, b"fraud:1", b"{not a profile"), (refs, b"other:1", b"[]")]))
    wait_until(lambda: worker.value("driftwarden_dead_letters_total", **invalid) == 2, 60,
               "two dead letters of references")
    assert worker.value("driftwarden_invalid_references") == 2

    # A readable profile for one key, a tombstone for the other: nothing unreadable is
    # latest any more.
    frame = pd.DataFrame({"x": [float(i) for i in range(200)],
                          "prediction": [i % 2 for i in range(200)]})
    profile = build_profile(frame, "fraud", "1", prediction="prediction")
    run(produce(kafka_broker, [(refs, b"fraud:1", profile.to_json()), (refs, b"other:1", None)]))
    wait_until(lambda: worker.value("driftwarden_invalid_references") == 0, 60,
               "the unreadable profiles to be replaced")
    assert worker.value("driftwarden_dead_letters_total", **invalid) == 2
    worker.stop()

    # A restarted worker reads the topic from the start: the two replaced profiles are not
    # dead-lettered again; one still latest for its key is, once.
    run(produce(kafka_broker, [(refs, b"third:1", b"nope")]))
    again = start_worker()
    wait_until(lambda: "references: read to the end (1 unreadable)" in again.log_text(), 60,
               "the restarted worker to read the references")
    wait_until(lambda: again.value("driftwarden_dead_letters_total", **invalid) == 1, 30,
               "the dead letter of the profile still latest")
    assert again.value("driftwarden_invalid_references") == 1
    letters = run(read_topic(kafka_broker, prefix + "dead-letters", idle=3.0))
    assert sorted((m.key, m.value, dict(m.headers)["dw.reason"]) for m in letters) == [
        (b"fraud:1", b"{not a profile", b"invalid_reference"),
        (b"other:1", b"[]", b"invalid_reference"),
        (b"third:1", b"nope", b"invalid_reference")]
    # The restarted worker found the profile the first one received.
    assert "reference profile for fraud:1 (200 rows) received" in again.log_text()


def test_a_tombstone_withdraws_the_profile_of_a_model_whose_name_holds_a_colon(
        start_worker, kafka_broker, prefix):
    # references is keyed model:version; "ns:fraud" version "1" is "ns:fraud:1", which
    # splits at its first ':' into another model ("ns") and version ("fraud:1").
    worker = start_worker()
    refs = prefix + "references"
    frame = pd.DataFrame({"x": [float(i) for i in range(200)],
                          "prediction": [i % 2 for i in range(200)]})
    profile = build_profile(frame, "ns:fraud", "1", prediction="prediction")
    run(produce(kafka_broker, [(refs, b"ns:fraud:1", profile.to_json())]))
    wait_until(lambda: "reference profile for ns:fraud:1 (200 rows) received"
               in worker.log_text(), 60, "the worker to receive the profile")
    run(produce(kafka_broker, [(refs, b"ns:fraud:1", None)]))
    wait_until(lambda: "reference profile for ns:fraud:1 withdrawn" in worker.log_text(), 60,
               "the worker to withdraw the profile")

    # The model's first prediction finds no published profile: it builds its own.
    event = {"id": "p-1", "model": "ns:fraud", "version": "1", "features": {"x": 1.0},
             "prediction": 1}
    run(produce(kafka_broker, [(prefix + "predictions", b"p-1", orjson.dumps(event))]))
    mv = {"model": "ns:fraud", "version": "1"}
    wait_until(lambda: worker.value("driftwarden_predictions_total", **mv) == 1, 60,
               "the prediction to be counted")
    wait_until(lambda: worker.by_label("driftwarden_reference_info", "source"), 30,
               "the version's reference to be exported")
    assert worker.by_label("driftwarden_reference_info", "source") == {"building": 1.0}
