"""Parsing and validation of PredictionEvent and LabelEvent (DESIGN.md section 3).

Events arrive as raw bytes. ``parse_prediction`` and ``parse_label`` decode them with
orjson and validate every required field; any problem raises :class:`InvalidEvent` with a
short reason code from :data:`REASONS`, which the worker turns into a dead letter. The
join tries :mod:`models.schema`'s msgspec decoders first, which return what these would
for a well-formed event, at half the cost, and leave every other event to these.

Examples
--------
>>> p = parse_prediction(b'{"id": "a1", "model": "fraud", "features": {"amount": 12.5},'
...                      b' "prediction": 1, "scores": {"0": 0.2, "1": 0.8}}', default_ts=10.0)
>>> (p.id, p.model, p.version, p.ts, p.prediction, p.confidence)
('a1', 'fraud', '0', 10.0, 1.0, 0.8)
>>> parse_label(b'{"id": "a1", "label": "0", "ts": "2025-11-22T08:00:00"}', default_ts=1.7638e9)
Label(id='a1', label='0', model=None, ts=1763798400.0)
>>> try:
...     parse_prediction(b'{"id": "a1", "model": "m", "features": {}, "prediction": NaN}', 0.0)
... except InvalidEvent as exc:
...     exc.reason
'non_finite'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from models.errors import InvalidEvent

__all__ = [
    "MAX_REGRESSION_VALUE",
    "REASONS",
    "SCORES_SUM_TOLERANCE",
    "Label",
    "Limits",
    "Prediction",
    "class_key",
    "parse_label",
    "parse_prediction",
    "regression_number",
]

#: Every reason code an input event can be dead-lettered with.
REASONS = frozenset(
    {
        "oversized",  # message larger than Limits.max_bytes
        "invalid_utf8",  # bytes are not UTF-8
        "invalid_json",  # not parseable JSON (truncated, garbage, ...)
        "too_deep",  # JSON nested deeper than the decoder allows
        "non_finite",  # NaN, Infinity or a number overflowing a double
        "not_an_object",  # valid JSON but not an object
        "missing_id",
        "invalid_id",  # not a non-empty string of at most 256 characters, or starts with NUL
        "missing_model",
        "invalid_model",
        "invalid_version",
        "missing_features",
        "invalid_features",  # not an object, or a value that is not number/string/bool/null
        "too_many_features",
        "missing_prediction",
        "invalid_prediction",
        "invalid_scores",
        "invalid_ts",
        "ts_out_of_range",
        "missing_label",
        "invalid_label",
        "model_mismatch",  # label.model disagrees with its prediction
        "unmatched_label",  # label whose prediction never arrived within the TTL
        "duplicate_prediction",
        "duplicate_label",
        "too_many_models",  # a partition already follows its most model versions
    }
)

_NON_FINITE_RE = re.compile(rb"NaN|-?Infinity")
#: How far from 1 the scores may sum: 0.01, and the rounding of a float sum (0.2 + 0.79
#: is 0.99 in decimal, 0.9900000000000001 - 1 = -0.010000000000000009 in floats).
SCORES_SUM_TOLERANCE = 0.01 + 1e-9


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a single event may contain.

    Parameters
    ----------
    max_bytes
        Largest accepted message.
    max_features
        Most features in one prediction.
    max_string
        Longest string feature value, model name or version.
    ts_window
        Largest distance, in seconds, between an event's ``ts`` and its Kafka timestamp.
    ts_ahead
        Largest time, in seconds, an event's ``ts`` may be after its Kafka timestamp (at
        most ``ts_window``): an event dated ahead moves its side's event-time watermark
        ahead, and with it the expiry of the other side's pending entries, so one label
        dated months ahead would expire every pending prediction of its partition.
    """

    max_bytes: int = 1_048_576
    max_features: int = 1000
    max_string: int = 1024
    ts_window: float = 366 * 86400.0
    ts_ahead: float = 86400.0
    ahead: float = field(init=False, repr=False)  # min(ts_ahead, ts_window)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ahead", min(self.ts_ahead, self.ts_window))


DEFAULT_LIMITS = Limits()


# Not frozen: one of each is made per input event, and a frozen dataclass takes four
# times as long to make (object.__setattr__ per field).
@dataclass(slots=True)
class Prediction:
    """A validated PredictionEvent. ``prediction`` and score keys are class keys."""

    id: str
    model: str
    version: str
    ts: float
    features: dict[str, Any]
    prediction: str | float
    scores: dict[str, float] | None

    @property
    def confidence(self) -> float | None:
        """Top-class probability, the label-free estimate of being right."""
        return max(self.scores.values()) if self.scores else None


@dataclass(slots=True)
class Label:
    """A validated LabelEvent."""

    id: str
    label: str | float
    model: str | None
    ts: float


#: Largest magnitude of a regression model's prediction or label: the squared difference
#: of two such numbers (a term of the RMSE) is still a finite float. river squares with
#: ``**``, which raises OverflowError past about 1.34e154 rather than giving inf.
MAX_REGRESSION_VALUE = 1e153


def regression_number(value: Any) -> bool:
    """Whether a regression model can score ``value`` as a prediction or label: a float
    (events hold finite ones only) of magnitude at most :data:`MAX_REGRESSION_VALUE`.

    >>> regression_number(2.5), regression_number(-1e153), regression_number(2e153)
    (True, True, False)
    >>> regression_number("2.5"), regression_number(True)
    (False, False)
    """
    return isinstance(value, float) and -MAX_REGRESSION_VALUE <= value <= MAX_REGRESSION_VALUE


def class_key(value: Any) -> str:
    """Canonical class key, so that ``1``, ``1.0`` and ``"1"`` are the same class.

    >>> class_key(1), class_key(1.0), class_key("1"), class_key(True)
    ('1', '1', '1', 'true')
    """
    if type(value) is str:  # the usual case, first
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _decode(raw: bytes, limits: Limits) -> dict[str, Any]:
    if len(raw) > limits.max_bytes:
        raise InvalidEvent("oversized", f"message is {len(raw)} bytes, limit {limits.max_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        text = str(exc)
        if "UTF-8" in text and "(BOM)" not in text:  # a BOM is UTF-8, but not JSON
            raise InvalidEvent("invalid_utf8", "message is not valid UTF-8") from None
        if "infinity" in text or _NON_FINITE_RE.match(raw, exc.pos):
            raise InvalidEvent("non_finite", f"non-finite number at byte {exc.pos}") from None
        if "depth limit" in text:
            raise InvalidEvent("too_deep", "JSON nesting too deep") from None
        raise InvalidEvent("invalid_json", f"not valid JSON ({text})") from None
    if not isinstance(doc, dict):
        raise InvalidEvent(
            "not_an_object", f"event must be a JSON object, got {type(doc).__name__}")
    return doc


def _id(doc: dict[str, Any]) -> str:
    if "id" not in doc:
        raise InvalidEvent("missing_id", "field 'id' is required")
    value = doc["id"]
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise InvalidEvent("invalid_id", "field 'id' must be a non-empty string of <= 256 chars")
    if value[0] == "\x00":  # the join's own entries are keyed so (models.join.meta_key)
        raise InvalidEvent("invalid_id", "field 'id' must not start with a NUL character")
    return value


def _name(doc: dict[str, Any], field: str, limits: Limits, default: str | None) -> str | None:
    value = doc.get(field)
    if value is None:
        if default is None and field == "model":
            raise InvalidEvent("missing_model", "field 'model' is required")
        return default
    if isinstance(value, int | float) and not isinstance(value, bool) and field == "version":
        value = class_key(value)  # versions are often written as numbers
    if not isinstance(value, str) or not 0 < len(value) <= limits.max_string:
        raise InvalidEvent(f"invalid_{field}", f"field '{field}' must be a non-empty string")
    return value


def _scalar(value: Any, field: str, reason: str) -> str | float:
    if isinstance(value, bool | str):
        return class_key(value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidEvent("non_finite", f"field '{field}' is not finite")
        return float(value)
    raise InvalidEvent(reason, f"field '{field}' must be a number, string or bool")


def _ts(doc: dict[str, Any], default_ts: float, limits: Limits) -> float:
    value = doc.get("ts")
    if value is None:
        return default_ts
    if isinstance(value, bool):
        raise InvalidEvent("invalid_ts", "field 'ts' must be epoch seconds or ISO-8601")
    if isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is None:  # naive ISO times are UTC, never the host's zone
                parsed = parsed.replace(tzinfo=UTC)
            ts = parsed.timestamp()
        except ValueError:
            raise InvalidEvent("invalid_ts", "field 'ts' is not ISO-8601") from None
    else:
        raise InvalidEvent("invalid_ts", "field 'ts' must be epoch seconds or ISO-8601")
    if not (math.isfinite(ts) and -limits.ts_window <= ts - default_ts <= limits.ahead):
        raise InvalidEvent("ts_out_of_range", "field 'ts' is too far from the Kafka timestamp")
    return ts


def _features(doc: dict[str, Any], limits: Limits) -> dict[str, Any]:
    if "features" not in doc:
        raise InvalidEvent("missing_features", "field 'features' is required")
    features = doc["features"]
    if not isinstance(features, dict):
        raise InvalidEvent("invalid_features", "field 'features' must be an object")
    if len(features) > limits.max_features:
        raise InvalidEvent(
            "too_many_features", f"{len(features)} features, limit {limits.max_features}"
        )
    max_string = limits.max_string
    for name, value in features.items():
        # Exact types, most common first: this loop runs for every feature of every event.
        # orjson (``_decode``) never yields a non-finite number, nor a subclass.
        kind = type(value)
        if kind is float or kind is int or kind is bool or value is None:
            continue
        if kind is str:
            if len(value) > max_string:
                raise InvalidEvent("invalid_features", f"feature '{name[:64]}' is too long")
        else:
            raise InvalidEvent(
                "invalid_features", f"feature '{name[:64]}' must be number, string, bool or null"
            )
    return features


def _scores(doc: dict[str, Any]) -> dict[str, float] | None:
    scores = doc.get("scores")
    if scores is None:
        return None
    if not isinstance(scores, dict) or not scores:
        raise InvalidEvent("invalid_scores", "field 'scores' must be a non-empty object")
    out: dict[str, float] = {}
    for key, p in scores.items():
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise InvalidEvent("invalid_scores", f"scores['{key[:64]}'] must be in [0, 1]")
        out[class_key(key)] = float(p)
    if abs(sum(out.values()) - 1.0) > SCORES_SUM_TOLERANCE:
        raise InvalidEvent("invalid_scores", "field 'scores' must sum to 1")
    return out


def parse_prediction(
    raw: bytes, default_ts: float, limits: Limits = DEFAULT_LIMITS
) -> Prediction:
    """Decode and validate a PredictionEvent.

    Parameters
    ----------
    raw
        The Kafka message value.
    default_ts
        Event time to use when the event has no ``ts`` (the Kafka timestamp, seconds).
    limits
        Size bounds.

    Raises
    ------
    InvalidEvent
        With one of :data:`REASONS`.
    """
    doc = _decode(raw, limits)
    event_id = _id(doc)
    model = _name(doc, "model", limits, None)
    version = _name(doc, "version", limits, "0")
    features = _features(doc, limits)
    if "prediction" not in doc:
        raise InvalidEvent("missing_prediction", "field 'prediction' is required")
    prediction = _scalar(doc["prediction"], "prediction", "invalid_prediction")
    return Prediction(
        id=event_id,
        model=model,  # type: ignore[arg-type]
        version=version,  # type: ignore[arg-type]
        ts=_ts(doc, default_ts, limits),
        features=features,
        prediction=prediction,
        scores=_scores(doc),
    )


def parse_label(raw: bytes, default_ts: float, limits: Limits = DEFAULT_LIMITS) -> Label:
    """Decode and validate a LabelEvent. Raises :class:`InvalidEvent` like parse_prediction."""
    doc = _decode(raw, limits)
    event_id = _id(doc)
    if "label" not in doc:
        raise InvalidEvent("missing_label", "field 'label' is required")
    label = _scalar(doc["label"], "label", "invalid_label")
    model = _name(doc, "model", limits, "") or None
    return Label(id=event_id, label=label, model=model, ts=_ts(doc, default_ts, limits))
