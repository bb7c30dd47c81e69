"""RetrainingPolicy (evidence, cooldown, hysteresis, severity, ids) and PolicyBook TOML."""

from __future__ import annotations

from typing import Any

import pytest

from models.errors import ConfigError
from models.performance import DriftSignal
from models.policy import PolicyBook, PolicyConfig, RetrainingPolicy

DRIFT = DriftSignal("ADWIN", 0.1, 0.3)


def policy(**config: Any) -> RetrainingPolicy:
    config = {"min_outcomes": 10, "cooldown_seconds": 60.0, **config}
    return RetrainingPolicy(PolicyConfig(**config), "fraud", "3")


def step(p: RetrainingPolicy, ts: float, accuracy: float | None = None,
         drift: DriftSignal | None = None, outcomes: int = 100,
         metrics: dict[str, float] | None = None, **kw: Any) -> dict[str, Any] | None:
    metrics = metrics or {}
    return p.update(ts=ts, outcomes_seen=outcomes, predictions_seen=outcomes + 20,
                    drift=drift, accuracy=accuracy, metrics=lambda: metrics, **kw)


def test_event_has_the_contract_shape() -> None:
    p = policy()
    assert step(p, 1000.0, accuracy=0.90) is None  # first full window: the reference
    event = step(p, 1100.0, accuracy=0.70, outcomes=500, metrics={"f1": 0.6})
    assert event == {
        "id": "fraud:3:000001",
        "model": "fraud",
        "version": "3",
        "ts": 1100.0,
        "severity": "critical",
        "reasons": [{"kind": "performance", "metric": "accuracy", "before": 0.90,
                     "after": 0.70, "threshold": pytest.approx(0.81, abs=1e-12)}],
        "evidence": {"predictions_seen": 520, "outcomes_seen": 500,
                     "window": {"start": 1000.0, "end": 1100.0}},
        "metrics": {"f1": 0.6, "accuracy": 0.70, "accuracy_reference": 0.90},
    }


def test_concept_drift_reason_carries_the_detector_and_error_rates() -> None:
    event = step(policy(), 10.0, drift=DRIFT)
    assert event is not None
    assert event["reasons"] == [{"kind": "concept_drift", "detector": "ADWIN",
                                 "metric": "error_rate", "before": 0.1, "after": 0.3}]
    assert event["severity"] == "warning"  # one reason, no accuracy drop known


def test_nothing_fires_before_min_outcomes() -> None:
    p = policy(min_outcomes=100)
    assert step(p, 1.0, accuracy=0.90, outcomes=50) is None
    assert step(p, 2.0, accuracy=0.50, drift=DRIFT, outcomes=99) is None
    assert p.reference == 0.90  # the reference is still taken from the first full window
    event = step(p, 3.0, accuracy=0.50, outcomes=100)
    assert event is not None and event["id"] == "fraud:3:000001"


def test_sustained_drop_gives_one_event_not_two() -> None:
    p = policy(cooldown_seconds=60.0)
    step(p, 0.0, accuracy=0.90)
    events = [step(p, float(ts), accuracy=0.70) for ts in range(1, 1000)]
    fired = [e for e in events if e is not None]
    assert [e["ts"] for e in fired] == [1.0]
    assert p.seq == 1


def test_cooldown_suppresses_a_second_signal_then_lets_the_next_through() -> None:
    p = policy(cooldown_seconds=60.0)
    first = step(p, 100.0, drift=DRIFT)
    assert step(p, 159.0, drift=DRIFT) is None  # 59 s later: inside the cooldown
    assert p.suppressed == 1
    second = step(p, 160.0, drift=DRIFT)  # 60 s later: allowed
    assert (first["id"], second["id"]) == ("fraud:3:000001", "fraud:3:000002")  # type: ignore[index]
    assert second["evidence"]["window"] == {"start": 100.0, "end": 160.0}  # type: ignore[index]


def test_drop_signalled_during_the_cooldown_is_latched_not_repeated() -> None:
    p = policy(cooldown_seconds=60.0)
    step(p, 0.0, accuracy=0.90)
    assert step(p, 10.0, drift=DRIFT, accuracy=0.90) is not None
    assert step(p, 20.0, accuracy=0.70) is None  # suppressed by the cooldown, and latched
    assert step(p, 500.0, accuracy=0.70) is None  # same episode after the cooldown
    assert (p.seq, p.suppressed) == (1, 1)


def test_hysteresis_rearms_only_after_a_real_recovery() -> None:
    p = policy(cooldown_seconds=0.0, accuracy_drop=0.10, hysteresis=0.02)
    step(p, 0.0, accuracy=0.90)  # threshold 0.81, re-arms at 0.83
    assert step(p, 1.0, accuracy=0.80) is not None
    assert step(p, 2.0, accuracy=0.825) is None  # above threshold, below re-arm level
    assert step(p, 3.0, accuracy=0.80) is None  # still latched
    assert step(p, 4.0, accuracy=0.84) is None  # recovered: re-armed
    event = step(p, 5.0, accuracy=0.80)
    assert event is not None and event["id"] == "fraud:3:000002"


def test_ids_are_deterministic_so_a_replay_republishes_the_same_ids() -> None:
    def run() -> list[tuple[str, float]]:
        p = policy(cooldown_seconds=10.0)
        fired = []
        for ts in range(0, 100, 3):  # drift at every odd ts: 3, 9, 15, ...
            event = step(p, float(ts), drift=DRIFT if ts % 2 else None)
            if event is not None:
                fired.append((event["id"], event["ts"]))
        return fired

    expected = [(f"fraud:3:{seq:06d}", ts) for seq, ts in
                enumerate([3.0, 15.0, 27.0, 39.0, 51.0, 63.0, 75.0, 87.0, 99.0], 1)]
    assert run() == run() == expected


# Fixed (models/policy.py, event_id): the id joined model and version with ":" as they
# were, so model "a:b" version "c" and model "a" version "b:c" shared ids, and a consumer
# de-duplicating by id, as DESIGN.md says to, dropped one version's real events.
def test_ids_of_two_model_versions_never_meet_when_names_hold_a_colon() -> None:
    ids = set()
    for model, version in [("a:b", "c"), ("a", "b:c"), ("a%3Ab", "c"), ("a", "b%3Ac")]:
        p = RetrainingPolicy(PolicyConfig(min_outcomes=1), model, version)
        event = step(p, 1.0, drift=DRIFT)
        assert event is not None and (event["model"], event["version"]) == (model, version)
        ids.add(event["id"])
    assert ids == {"a%3Ab:c:000001", "a:b%3Ac:000001", "a%253Ab:c:000001", "a:b%253Ac:000001"}


@pytest.mark.parametrize(("accuracy", "drift", "severity"), [
    (0.79, None, "warning"),     # drop 12.2 %: below threshold 0.81, under critical_drop 20 %
    (0.70, None, "critical"),    # drop 22 %: over critical_drop 20 %
    (0.79, DRIFT, "critical"),   # two reasons at once
])
def test_severity(accuracy: float, drift: DriftSignal | None, severity: str) -> None:
    p = policy()
    step(p, 0.0, accuracy=0.90)
    event = step(p, 1.0, accuracy=accuracy, drift=drift)
    assert event is not None and event["severity"] == severity


def test_threshold_is_the_higher_of_the_absolute_floor_and_the_relative_drop() -> None:
    p = policy(accuracy_min=0.85, accuracy_drop=0.10)
    assert p.threshold() == 0.85  # no reference yet: the floor alone
    step(p, 0.0, accuracy=0.90)
    assert p.threshold() == 0.85  # floor 0.85 beats 0.90 * (1 - 0.10) = 0.81
    event = step(p, 1.0, accuracy=0.84)
    assert event is not None and event["reasons"][0]["threshold"] == 0.85

    q = policy(accuracy_min=0.50, accuracy_drop=0.10)
    step(q, 0.0, accuracy=0.90)
    assert q.threshold() == pytest.approx(0.81, abs=1e-12)
    assert step(q, 1.0, accuracy=0.82) is None
    assert step(q, 2.0, accuracy=0.80) is not None


# Fixed (models/policy.py, RetrainingPolicy.update): the threshold is a product of floats
# and may round up (0.53 * 0.9 is 0.47700000000000004), so an accuracy exactly at it
# counted as below it and fired, where the README says an event fires below it.
def test_an_accuracy_exactly_at_the_threshold_does_not_fire_and_one_outcome_below_does() -> None:
    p = policy(cooldown_seconds=0.0, accuracy_drop=0.10, hysteresis=0.05)
    step(p, 0.0, accuracy=530 / 1000)
    assert p.threshold() == 0.47700000000000004
    assert step(p, 1.0, accuracy=477 / 1000) is None
    assert step(p, 2.0, accuracy=476 / 1000) is not None  # one outcome of 1,000 below
    # Re-armed at exactly threshold + hysteresis (0.527), which rounds up too.
    assert step(p, 3.0, accuracy=527 / 1000) is None
    assert step(p, 4.0, accuracy=476 / 1000) is not None
    # Over the largest window, one outcome below still fires.
    q = policy(cooldown_seconds=0.0, accuracy_drop=0.10, window=1_000_000)
    step(q, 0.0, accuracy=530_000 / 1_000_000)
    assert step(q, 1.0, accuracy=476_999 / 1_000_000) is not None


def test_a_drop_exactly_at_critical_drop_is_critical() -> None:
    # (0.5 - 0.4) / 0.5 is 0.19999999999999996: it was a warning.
    p = policy(cooldown_seconds=0.0, accuracy_drop=0.10, critical_drop=0.20)
    step(p, 0.0, accuracy=0.5)
    event = step(p, 1.0, accuracy=0.4)
    assert event is not None and event["severity"] == "critical"


def test_absolute_floor_fires_before_any_reference() -> None:
    p = policy(accuracy_min=0.95)
    event = step(p, 0.0, accuracy=0.90)  # becomes the reference and is below the floor
    assert event is not None and event["reasons"][0]["threshold"] == 0.95


def test_without_floor_or_reference_accuracy_never_fires() -> None:
    p = policy()
    assert p.threshold() is None
    assert step(p, 0.0, accuracy=None) is None


def test_extra_reasons_are_published() -> None:
    reason = {"kind": "feature_drift", "feature": "amount", "statistic": "psi",
              "value": 0.41, "threshold": 0.2}
    event = step(policy(), 0.0, extra_reasons=[reason])
    assert event is not None and event["reasons"] == [reason]


# -- PolicyConfig -------------------------------------------------------------------------


def test_policy_config_defaults() -> None:
    c = PolicyConfig()
    assert (c.task, c.window, c.detector, c.detector_params, c.min_outcomes) == (
        "classification", 1000, "ADWIN", {}, 1000)
    assert (c.cooldown_seconds, c.accuracy_min, c.accuracy_drop, c.critical_drop,
            c.hysteresis) == (3600.0, None, 0.10, 0.20, 0.02)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"task": "ranking"}, "'task'"),
    ({"detector": "KSWIN"}, "'detector'"),
    ({"window": 0}, "'window'"),
    ({"window": 2.5}, "'window'"),
    ({"window": 10**20}, "'window'"),  # a byte each, per version: refused at start-up
    ({"min_outcomes": -1}, "'min_outcomes'"),
    ({"cooldown_seconds": -1}, "'cooldown_seconds'"),
    ({"accuracy_drop": 1.0}, "'accuracy_drop'"),
    ({"critical_drop": -0.1}, "'critical_drop'"),
    ({"hysteresis": 1.5}, "'hysteresis'"),
    ({"accuracy_min": 1.5}, "'accuracy_min'"),
])
def test_bad_policy_values_raise_config_error_naming_the_key_and_value(
        kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        PolicyConfig(**kwargs)
    message = str(raised.value)
    assert message.startswith(f"policy {key} must ")
    assert message.endswith(f"got {next(iter(kwargs.values()))!r}")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window": 1_000_001}, "policy 'window' must be at most 1,000,000, got 1000001"),
    ({"drift_bins": 10**20}, "policy 'drift_bins' must be from 2 to 1000"),
    ({"drift_top_k": 1001}, "policy 'drift_top_k' must be at most 1000"),
    ({"reference_size": 10**7}, "policy 'reference_size' must be at most 1,000,000"),
    ({"drift_max_features": 10_001}, "policy 'drift_max_features' must be at most 10,000"),
])
def test_sizes_that_would_exhaust_memory_are_refused_at_start_up(
        kwargs: dict[str, Any], message: str) -> None:
    # Each allocates per model version (a byte per outcome of the window, buffered
    # predictions, counts per bin): 10**20 raised OverflowError at the first event.
    with pytest.raises(ConfigError) as raised:
        PolicyConfig(**kwargs)
    assert str(raised.value) == message


# -- PolicyBook.from_toml -----------------------------------------------------------------

POLICY_TOML = """
[default]
detector = "DDM"
min_outcomes = 200
cooldown_seconds = 600

[models.fraud]
window = 500
accuracy_min = 0.9
detector_params = { warm_start = 50 }

[models.churn]
task = "regression"
detector = "PageHinkley"
"""


def test_from_toml_default_and_per_model_overrides() -> None:
    book = PolicyBook.from_toml(POLICY_TOML)
    assert book.default == PolicyConfig(detector="DDM", min_outcomes=200, cooldown_seconds=600)
    # A model section overrides the default section key by key.
    assert book.for_model("fraud") == PolicyConfig(
        detector="DDM", min_outcomes=200, cooldown_seconds=600, window=500,
        accuracy_min=0.9, detector_params={"warm_start": 50})
    assert book.for_model("churn") == PolicyConfig(
        task="regression", detector="PageHinkley", min_outcomes=200, cooldown_seconds=600)
    assert book.for_model("unknown") is book.default


def test_from_toml_empty_document_gives_the_defaults() -> None:
    book = PolicyBook.from_toml("")
    assert book.default == PolicyConfig() and book.models == {}


@pytest.mark.parametrize(("text", "names"), [
    ("[default]\nwindw = 5", ["unknown key(s) ['windw']", "[default]"]),
    ("[models.fraud]\ncooldown = 5", ["unknown key(s) ['cooldown']", "[models.fraud]"]),
    ("[models.fraud]\ndetector = 'KSWIN'", ["[models.fraud]", "'detector'"]),
    ("[default]\nwindow = 0", ["[default]", "'window'"]),
    ("[default]\naccuracy_min = 1.5", ["[default]", "'accuracy_min'"]),
    ("[default]\ntask = 'ranking'", ["[default]", "'task'"]),
    ("[models.a]\ncooldown_seconds = -1", ["[models.a]", "'cooldown_seconds'"]),
    ("[default\n", ["policy.toml is not valid TOML"]),
])
def test_from_toml_errors_name_the_file_section_and_key(text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        PolicyBook.from_toml(text, source="policy.toml")
    assert str(info.value).startswith("policy.toml")
    for name in names:
        assert name in str(info.value)


# Fixed (models/policy.py, PolicyBook.from_toml / PolicyConfig.__post_init__): a value of
# the wrong type is reported by Python's comparison error, which does not name the key,
# e.g. "policy file [default]: '<' not supported between instances of 'str' and 'int'".
@pytest.mark.parametrize(("text", "key"), [
    ('[default]\ncooldown_seconds = "1h"', "'cooldown_seconds'"),
    ('[models.fraud]\naccuracy_drop = "10%"', "'accuracy_drop'"),
])
def test_from_toml_wrong_type_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        PolicyBook.from_toml(text)
    assert key in str(info.value)


# Fixed (models/policy.py, PolicyBook.from_toml): a section that is not a table escapes as
# TypeError/AttributeError instead of ConfigError, so the CLI prints a traceback.
@pytest.mark.parametrize("text", ["default = 5", "models = 5", "[models]\nfraud = 3"])
def test_from_toml_section_that_is_not_a_table_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        PolicyBook.from_toml(text)


# Fixed (models/policy.py, PolicyConfig.__post_init__): booleans pass the integer check
# (bool is an int subclass), so `window = true` is accepted as a window of 1.
@pytest.mark.parametrize("key", ["window", "min_outcomes"])
def test_from_toml_rejects_a_boolean_where_an_integer_is_needed(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        PolicyBook.from_toml(f"[default]\n{key} = true")


# Fixed (models/policy.py, PolicyBook.from_toml): unknown keys inside a section are refused,
# but a misspelt section ([defaults], [model.fraud]) is silently ignored.
@pytest.mark.parametrize("text", ["[defaults]\nwindow = 5", "[model.fraud]\nwindow = 5"])
def test_from_toml_rejects_an_unknown_section(text: str) -> None:
    with pytest.raises(ConfigError):
        PolicyBook.from_toml(text)


# Fixed (models/policy.py, PolicyConfig): detector_params are not checked when the policy
# is loaded; a bad one only fails later, as a TypeError inside the worker, when the first
# record of that model builds its PerformanceMonitor.
@pytest.mark.parametrize("params", ['"fast"', "{ no_such_param = 1 }"])
def test_from_toml_rejects_bad_detector_params_at_load_time(params: str) -> None:
    with pytest.raises(ConfigError, match="detector_params"):
        PolicyBook.from_toml(f"[default]\ndetector_params = {params}")


# Fixed (models/policy.py, PolicyConfig; models.performance.try_detector): values river
# accepts when it builds a detector but fails on later were accepted at start-up. In the
# worker, HDDM_A's drift_confidence 5.0 failed every outcome of the model (each records
# message dead-lettered), a string threshold once the warm-up was over, and ADWIN's
# clock 0 panicked in river's Rust core with a BaseException that stopped the worker.
@pytest.mark.parametrize(("detector", "params", "why"), [
    ("HDDM_A", "{ drift_confidence = 5.0 }",
     "'drift_confidence' is a probability: it must be in (0, 1); got 5.0"),
    ("PageHinkley", '{ threshold = "x" }', "'threshold' must be a number, like its default "
     "50.0; got 'x'"),
    ("DDM", '{ warm_start = 2.5 }', "'warm_start' must be an integer, like its default 30; "
     "got 2.5"),
    ("ADWIN", "{ delta = 0 }", "'delta' is a probability: it must be in (0, 1); got 0"),
    ("ADWIN", "{ clock = 0 }", "running it failed: attempt to calculate the remainder with a "
     "divisor of zero (PanicException)"),
    ("ADWIN", "{ max_buckets = 0 }", "running it failed: index out of bounds: the len is 1 but "
     "the index is 1 (PanicException)"),
])
def test_detector_params_river_accepts_but_cannot_run_are_refused_at_load_time(
        detector: str, params: str, why: str) -> None:
    text = f'[default]\ndetector = "{detector}"\n[models.fraud]\ndetector_params = {params}'
    with pytest.raises(ConfigError) as caught:
        PolicyBook.from_toml(text)
    assert str(caught.value) == (f"policy file [models.fraud]: policy 'detector_params' do "
                                 f"not suit {detector}: {why}")


def test_detector_params_that_run_are_kept() -> None:
    book = PolicyBook.from_toml('[default]\ndetector = "PageHinkley"\n'
                                "detector_params = { threshold = 5, min_instances = 50 }")
    assert book.default.detector_params == {"threshold": 5, "min_instances": 50}
