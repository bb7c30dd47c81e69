"""Parsing and validation of PredictionEvent / LabelEvent (DESIGN.md section 3).

Every reason code parsing can produce appears in the bad-input corpus below; the codes
only the join produces (unmatched_label, model_mismatch, duplicate_*) are in test_join.py.
"""

from __future__ import annotations

import orjson
import pytest

from models.errors import DriftwardenError, InvalidEvent
from models.events import (
    REASONS,
    Label,
    Limits,
    Prediction,
    class_key,
    parse_label,
    parse_prediction,
)

KAFKA_TS = 1_763_800_000.0  # the Kafka timestamp handed to the parser
JOIN_ONLY = {"unmatched_label", "model_mismatch", "duplicate_prediction", "duplicate_label",
             "too_many_models"}


def pred(**fields: object) -> bytes:
    """A valid prediction with ``fields`` replaced (a value of ... removes the field)."""
    doc = {"id": "p1", "model": "fraud", "features": {"amount": 12.5}, "prediction": 1}
    doc.update(fields)
    return orjson.dumps({k: v for k, v in doc.items() if v is not ...})


def label(**fields: object) -> bytes:
    doc = {"id": "p1", "label": 0}
    doc.update(fields)
    return orjson.dumps({k: v for k, v in doc.items() if v is not ...})


# -- valid events -------------------------------------------------------------------------


def test_full_prediction_from_the_design_document() -> None:
    raw = (b'{"id": "9f1c", "model": "fraud", "version": "3", "ts": 1763800000.25,'
           b' "features": {"amount": 12.5, "country": "DE", "is_new": true, "age": null},'
           b' "prediction": 1, "scores": {"0": 0.1, "1": 0.9}}')
    p = parse_prediction(raw, default_ts=KAFKA_TS)
    assert p == Prediction(
        id="9f1c", model="fraud", version="3", ts=1763800000.25,
        features={"amount": 12.5, "country": "DE", "is_new": True, "age": None},
        prediction=1.0, scores={"0": 0.1, "1": 0.9},
    )
    assert p.confidence == 0.9


def test_prediction_defaults_version_zero_and_kafka_timestamp() -> None:
    p = parse_prediction(pred(), default_ts=KAFKA_TS)
    assert (p.version, p.ts, p.scores, p.confidence) == ("0", KAFKA_TS, None, None)


def test_explicit_null_version_and_ts_take_the_defaults() -> None:
    p = parse_prediction(pred(version=None, ts=None), default_ts=KAFKA_TS)
    assert (p.version, p.ts) == ("0", KAFKA_TS)


@pytest.mark.parametrize(("version", "expected"),
                         [(3, "3"), (3.0, "3"), (2.5, "2.5"), ("v7", "v7")])
def test_numeric_versions_become_strings(version: object, expected: str) -> None:
    assert parse_prediction(pred(version=version), KAFKA_TS).version == expected


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1763800000, 1763800000.0),
        (1763800000.25, 1763800000.25),
        ("2025-11-22T08:00:00Z", 1763798400.0),
        ("2025-11-22T09:00:00+01:00", 1763798400.0),
        ("2025-11-22T08:00:00", 1763798400.0),  # naive ISO time is UTC, not the host's zone
        ("2025-11-22T08:00:00.500+00:00", 1763798400.5),
    ],
)
def test_ts_epoch_seconds_or_iso8601(ts: object, expected: float) -> None:
    assert parse_prediction(pred(ts=ts), KAFKA_TS).ts == expected
    assert parse_label(label(ts=ts), KAFKA_TS).ts == expected


def test_ts_exactly_at_the_window_edge_is_accepted() -> None:
    limits = Limits(ts_window=60.0)
    assert parse_prediction(pred(ts=KAFKA_TS + 60), KAFKA_TS, limits).ts == KAFKA_TS + 60
    assert parse_prediction(pred(ts=KAFKA_TS - 60), KAFKA_TS, limits).ts == KAFKA_TS - 60


def test_ts_may_be_366_days_before_the_kafka_timestamp_but_one_day_after() -> None:
    # Dated ahead, an event moves its side's event-time watermark ahead (models.join).
    assert parse_label(label(ts=KAFKA_TS - 366 * 86400), KAFKA_TS).ts == KAFKA_TS - 366 * 86400
    assert parse_label(label(ts=KAFKA_TS + 86400), KAFKA_TS).ts == KAFKA_TS + 86400
    for raw in (label(ts=KAFKA_TS + 86401), pred(ts=KAFKA_TS + 86401)):
        with pytest.raises(InvalidEvent) as info:
            (parse_label if b'"label"' in raw else parse_prediction)(raw, KAFKA_TS)
        assert info.value.reason == "ts_out_of_range"
    hour = Limits(ts_ahead=3600.0)
    assert parse_label(label(ts=KAFKA_TS + 3600), KAFKA_TS, hour).ts == KAFKA_TS + 3600
    with pytest.raises(InvalidEvent, match="ts_out_of_range"):
        parse_label(label(ts=KAFKA_TS + 3601), KAFKA_TS, hour)


def test_unknown_fields_are_ignored() -> None:
    raw = pred(extra={"nested": [1, 2]}, trace_id="abc", another=None)
    assert parse_prediction(raw, KAFKA_TS) == parse_prediction(pred(), KAFKA_TS)
    assert parse_label(label(note="late"), KAFKA_TS) == parse_label(label(), KAFKA_TS)


def test_class_keys_make_1_and_1_0_and_quoted_1_the_same_class() -> None:
    assert [class_key(v) for v in (1, 1.0, "1", True, False, 2.5, "cat")] == [
        "1", "1", "1", "true", "false", "2.5", "cat"]
    p = parse_prediction(pred(prediction="yes", scores={"yes": 0.75, "no": 0.25}), KAFKA_TS)
    assert (p.prediction, p.scores, p.confidence) == ("yes", {"yes": 0.75, "no": 0.25}, 0.75)
    assert parse_prediction(pred(prediction=True), KAFKA_TS).prediction == "true"


def test_scores_may_sum_to_one_within_one_percent() -> None:
    p = parse_prediction(pred(scores={"0": 0.2, "1": 0.809}), KAFKA_TS)
    assert p.scores == {"0": 0.2, "1": 0.809}
    # Exactly 0.01 off in decimal, a little more in floats: still accepted.
    for scores in ({"0": 0.2, "1": 0.79}, {"0": 0.01, "1": 1.0}):
        assert abs(sum(scores.values()) - 1.0) > 0.01  # the rounding this test is about
        assert parse_prediction(pred(scores=scores), KAFKA_TS).scores == scores
    with pytest.raises(InvalidEvent, match="invalid_scores"):
        parse_prediction(pred(scores={"0": 0.2, "1": 0.789}), KAFKA_TS)


def test_id_of_exactly_256_characters_is_accepted() -> None:
    assert parse_prediction(pred(id="x" * 256), KAFKA_TS).id == "x" * 256


def test_feature_count_and_string_length_at_their_limits_are_accepted() -> None:
    limits = Limits(max_features=3, max_string=5)
    features = {"a": "12345", "b": 1, "c": None}
    assert parse_prediction(pred(features=features), KAFKA_TS, limits).features == features


def test_message_at_max_bytes_is_accepted() -> None:
    raw = pred()
    assert parse_prediction(raw, KAFKA_TS, Limits(max_bytes=len(raw))).id == "p1"


def test_label_with_all_fields() -> None:
    lab = parse_label(label(label="fraud", model="fraud", ts=KAFKA_TS + 360), KAFKA_TS)
    assert lab == Label(id="p1", label="fraud", model="fraud", ts=KAFKA_TS + 360)


def test_label_defaults_no_model_and_kafka_timestamp() -> None:
    assert parse_label(label(), KAFKA_TS) == Label(id="p1", label=0.0, model=None, ts=KAFKA_TS)
    assert parse_label(label(model=None), KAFKA_TS).model is None


# -- bad input ----------------------------------------------------------------------------

# (case id, raw bytes, expected reason, text the message must contain)
BAD_PREDICTIONS = [
    ("truncated", pred()[:-5], "invalid_json", "not valid JSON"),
    ("garbage", b"hello", "invalid_json", "not valid JSON"),
    ("empty", b"", "invalid_json", "not valid JSON"),
    ("lone-surrogate", b'{"id": "\\ud800"}', "invalid_json", "not valid JSON"),
    ("invalid-utf8", b'{"id": "p\xff1"}', "invalid_utf8", "UTF-8"),
    ("utf16", '{"id": "p1"}'.encode("utf-16"), "invalid_utf8", "UTF-8"),
    ("list", b"[1, 2]", "not_an_object", "list"),
    ("number", b"42", "not_an_object", "int"),
    ("string", b'"p1"', "not_an_object", "str"),
    ("null", b"null", "not_an_object", "NoneType"),
    ("too-deep", b"[" * 2000 + b"]" * 2000, "too_deep", "nesting"),
    ("too-deep-unknown-field", pred()[:-1] + b', "deep": ' + b"[" * 2000 + b"]" * 2000 + b"}",
     "too_deep", "nesting"),
    ("nan", pred(prediction=1).replace(b'"prediction":1', b'"prediction":NaN'),
     "non_finite", "non-finite"),
    ("infinity", pred(prediction=1).replace(b'"prediction":1', b'"prediction":Infinity'),
     "non_finite", "non-finite"),
    ("minus-infinity", pred(prediction=1).replace(b'"prediction":1', b'"prediction":-Infinity'),
     "non_finite", "non-finite"),
    ("overflow", pred(prediction=1).replace(b'"prediction":1', b'"prediction":1e400'),
     "non_finite", "non-finite"),
    ("nan-feature", pred().replace(b"12.5", b"NaN"), "non_finite", "non-finite"),
    ("missing-id", pred(id=...), "missing_id", "'id'"),
    ("empty-id", pred(id=""), "invalid_id", "'id'"),
    ("long-id", pred(id="x" * 257), "invalid_id", "'id'"),
    ("number-id", pred(id=5), "invalid_id", "'id'"),
    ("null-id", pred(id=None), "invalid_id", "'id'"),
    ("list-id", pred(id=["p1"]), "invalid_id", "'id'"),
    ("missing-model", pred(model=...), "missing_model", "'model'"),
    ("null-model", pred(model=None), "missing_model", "'model'"),
    ("empty-model", pred(model=""), "invalid_model", "'model'"),
    ("number-model", pred(model=7), "invalid_model", "'model'"),
    ("huge-model", pred(model="m" * 1025), "invalid_model", "'model'"),
    ("bool-version", pred(version=True), "invalid_version", "'version'"),
    ("empty-version", pred(version=""), "invalid_version", "'version'"),
    ("list-version", pred(version=[3]), "invalid_version", "'version'"),
    ("huge-version", pred(version="v" * 1025), "invalid_version", "'version'"),
    ("missing-features", pred(features=...), "missing_features", "'features'"),
    ("list-features", pred(features=[1, 2]), "invalid_features", "'features'"),
    ("null-features", pred(features=None), "invalid_features", "'features'"),
    ("string-features", pred(features="amount=1"), "invalid_features", "'features'"),
    ("object-feature", pred(features={"amount": {"v": 1}}), "invalid_features", "'amount'"),
    ("list-feature", pred(features={"tags": ["a"]}), "invalid_features", "'tags'"),
    ("huge-string-feature", pred(features={"note": "x" * 1025}), "invalid_features", "'note'"),
    ("too-many-features", pred(features={f"f{i}": i for i in range(1001)}),
     "too_many_features", "1001 features"),
    ("missing-prediction", pred(prediction=...), "missing_prediction", "'prediction'"),
    ("null-prediction", pred(prediction=None), "invalid_prediction", "'prediction'"),
    ("list-prediction", pred(prediction=[1]), "invalid_prediction", "'prediction'"),
    ("object-prediction", pred(prediction={"c": 1}), "invalid_prediction", "'prediction'"),
    ("list-scores", pred(scores=[0.1, 0.9]), "invalid_scores", "'scores'"),
    ("empty-scores", pred(scores={}), "invalid_scores", "'scores'"),
    ("string-scores", pred(scores="0.9"), "invalid_scores", "'scores'"),
    ("score-above-1", pred(scores={"1": 1.5}), "invalid_scores", "scores['1']"),
    ("negative-score", pred(scores={"0": -0.1, "1": 1.1}), "invalid_scores", "scores['0']"),
    ("bool-score", pred(scores={"1": True}), "invalid_scores", "scores['1']"),
    ("string-score", pred(scores={"1": "0.9"}), "invalid_scores", "scores['1']"),
    ("scores-not-summing-to-1", pred(scores={"0": 0.3, "1": 0.3}), "invalid_scores",
     "'scores'"),
    ("bool-ts", pred(ts=True), "invalid_ts", "'ts'"),
    ("list-ts", pred(ts=[1]), "invalid_ts", "'ts'"),
    ("garbage-ts", pred(ts="yesterday"), "invalid_ts", "'ts'"),
    ("empty-ts", pred(ts=""), "invalid_ts", "'ts'"),
    ("year-99999-ts", pred(ts="99999-01-01"), "invalid_ts", "'ts'"),
    ("ts-in-milliseconds", pred(ts=KAFKA_TS * 1000), "ts_out_of_range", "'ts'"),
    ("ts-year-1", pred(ts="0001-01-01T00:00:00"), "ts_out_of_range", "'ts'"),
    ("ts-huge", pred(ts=1e308), "ts_out_of_range", "'ts'"),
    ("ts-huge-negative", pred(ts=-1e308), "ts_out_of_range", "'ts'"),
    ("ts-367-days-early", pred(ts=KAFKA_TS - 367 * 86400), "ts_out_of_range", "'ts'"),
    ("ts-a-day-and-a-second-ahead", pred(ts=KAFKA_TS + 86401), "ts_out_of_range", "'ts'"),
    ("utf8-byte-order-mark", b"\xef\xbb\xbf" + pred(), "invalid_json", "(BOM)"),
]

BAD_LABELS = [
    ("truncated", label()[:-3], "invalid_json", "not valid JSON"),
    ("invalid-utf8", b'{"id": "\xc3\x28", "label": 1}', "invalid_utf8", "UTF-8"),
    ("list", b'[{"id": "p1", "label": 1}]', "not_an_object", "list"),
    ("nan-label", b'{"id": "p1", "label": NaN}', "non_finite", "non-finite"),
    ("missing-id", label(id=...), "missing_id", "'id'"),
    ("empty-id", label(id=""), "invalid_id", "'id'"),
    ("long-id", label(id="x" * 257), "invalid_id", "'id'"),
    ("missing-label", label(label=...), "missing_label", "'label'"),
    ("null-label", label(label=None), "invalid_label", "'label'"),
    ("object-label", label(label={"c": 0}), "invalid_label", "'label'"),
    ("list-label", label(label=[0]), "invalid_label", "'label'"),
    ("empty-model", label(model=""), "invalid_model", "'model'"),
    ("number-model", label(model=3), "invalid_model", "'model'"),
    ("garbage-ts", label(ts="soon"), "invalid_ts", "'ts'"),
    ("ts-out-of-range", label(ts=0), "ts_out_of_range", "'ts'"),
    ("ts-300-days-ahead", label(ts=KAFKA_TS + 300 * 86400), "ts_out_of_range", "'ts'"),
]


BAD_EVENTS = [(parse_prediction, *c) for c in BAD_PREDICTIONS] + [
    (parse_label, *c) for c in BAD_LABELS]


@pytest.mark.parametrize(
    ("parse", "raw", "reason", "names"), [(c[0], *c[2:]) for c in BAD_EVENTS],
    ids=[f"{c[0].__name__.removeprefix('parse_')}-{c[1]}" for c in BAD_EVENTS])
def test_bad_event_is_rejected_with_its_reason(parse, raw: bytes, reason: str, names: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse(raw, KAFKA_TS)
    assert info.value.reason == reason
    assert names in str(info.value)
    assert str(info.value).startswith(f"{reason}: ")


def test_oversized_message_is_rejected_before_decoding() -> None:
    limits = Limits(max_bytes=100)
    raw = b"{" + b" " * 100  # would also be invalid JSON: size is checked first
    with pytest.raises(InvalidEvent) as info:
        parse_prediction(raw, KAFKA_TS, limits)
    assert info.value.reason == "oversized"
    assert "101 bytes, limit 100" in str(info.value)


def test_default_size_limit_is_one_mebibyte() -> None:
    raw = pred(features={"blob": "x"})[:-2] + b" " * 1_048_576 + b"}}"
    with pytest.raises(InvalidEvent) as info:
        parse_label(raw, KAFKA_TS)
    assert info.value.reason == "oversized"
    assert "limit 1048576" in str(info.value)


def test_custom_limits_apply() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_prediction(pred(features={"a": 1, "b": 2}), KAFKA_TS, Limits(max_features=1))
    assert (info.value.reason, str(info.value)) == (
        "too_many_features", "too_many_features: 2 features, limit 1")
    with pytest.raises(InvalidEvent) as info:
        parse_prediction(pred(ts=KAFKA_TS + 61), KAFKA_TS, Limits(ts_window=60.0))
    assert info.value.reason == "ts_out_of_range"


def test_invalid_event_is_a_driftwarden_error_and_a_value_error() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_prediction(b"[]", KAFKA_TS)
    assert isinstance(info.value, DriftwardenError)
    assert isinstance(info.value, ValueError)


def test_corpus_covers_every_reason_parsing_can_produce() -> None:
    produced = {c[2] for c in BAD_PREDICTIONS + BAD_LABELS} | {"oversized"}
    assert produced == REASONS - JOIN_ONLY


# Fixed (models/events.py, _decode): a syntax error is reported as "non_finite" whenever the
# nine bytes after the error position contain NaN/Infinity, even inside a string. Here a
# missing comma before the key "NaN" is dead-lettered as non_finite, not invalid_json.
def test_syntax_error_next_to_a_string_saying_nan_is_invalid_json() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_label(b'{"id": "p1", "label": 1 "NaN": 2}', KAFKA_TS)
    assert info.value.reason == "invalid_json"
