"""The event contract as msgspec types: well-formed events decoded and checked in C.

:func:`models.events.parse_prediction` validates a decoded dict field by field in Python,
which costs three times the decoding itself (~4.8 us for the benchmark's 20-feature
prediction, ~1.4 us of it ``orjson.loads``). Almost every event is well formed, so these
decoders try first: msgspec checks the JSON and the field types while it decodes, and
only a few checks remain in Python. They never decide that an event is bad: whatever
they refuse — a decode or type error, or a remaining check that fails — returns None,
and the caller runs the full validator, which names the reason. So the result is the
validator's for every input, which ``tests/models/test_schema.py`` checks on valid, edge
and hostile events and on seeded random corruptions of them.

Where msgspec reads JSON differently from orjson, the types send the event to the
validator: an integer outside 64 bits (orjson reads it as a float, or refuses it beyond
a double's range, where msgspec keeps an int; every integer field is bounded), a field
the contract does not name (msgspec would skip JSON nested deeper than orjson allows),
an ISO-8601 ``ts``. Both refuse non-finite numbers and lone surrogates. Checked after
decoding: ``ts`` within the window of the Kafka timestamp, scores in [0, 1] summing to
1, the number of features, the length of a number version's class key.

Examples
--------
>>> from models.events import DEFAULT_LIMITS
>>> p = prediction(b'{"id": "a1", "model": "fraud", "features": {"amount": 12.5},'
...                b' "prediction": 1, "scores": {"0": 0.2, "1": 0.8}}', 10.0, DEFAULT_LIMITS)
>>> (p.id, p.model, p.version, p.ts, p.prediction, p.confidence)
('a1', 'fraud', '0', 10.0, 1.0, 0.8)
>>> prediction(b'{"id": "", "model": "fraud", "features": {}, "prediction": 1}',
...            10.0, DEFAULT_LIMITS) is None  # the validator says why: invalid_id
True
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from models.events import SCORES_SUM_TOLERANCE, Label, Limits, Prediction, class_key

__all__ = ["label", "prediction"]

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# Integers as orjson keeps them (msgspec bounds must fit an int64; a larger one that
# orjson would keep goes to the validator, which is as right, only slower).
_Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Scalar = _Int | float | bool | str
_Ts = _Int | float | str | None
_Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]  # an int is read as a float
_Decoders = tuple[msgspec.json.Decoder[Any], msgspec.json.Decoder[Any]]  # predictions, labels


def _decoders(limits: Limits) -> _Decoders | None:
    """The decoders for ``limits`` (the last ones asked for, kept: hashing ``limits`` on
    every call would cost a tenth of the decoding); None for limits msgspec cannot
    express (a negative or huge ``max_string``): every event then goes to the validator."""
    global _last
    if _last[0] is not limits:
        try:
            decoders: _Decoders | None = _make_decoders(limits)
        except (TypeError, ValueError):
            decoders = None
        _last = (limits, decoders)
    return _last[1]


def _make_decoders(limits: Limits) -> _Decoders:
    name = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_string)]
    text = Annotated[str, msgspec.Meta(max_length=limits.max_string)]
    prediction_doc = msgspec.defstruct("PredictionDoc", [
        ("id", _Id),
        ("model", name),
        ("features", dict[str, _Int | float | bool | text | None]),
        ("prediction", _Scalar),
        ("version", name | _Int | float | None, None),
        ("ts", _Ts, None),
        ("scores", dict[str, _Probability] | None, None),
    ], forbid_unknown_fields=True)
    label_doc = msgspec.defstruct("LabelDoc", [
        ("id", _Id),
        ("label", _Scalar),
        ("model", name | None, None),
        ("ts", _Ts, None),
    ], forbid_unknown_fields=True)
    return msgspec.json.Decoder(prediction_doc), msgspec.json.Decoder(label_doc)


_last: tuple[Limits | None, _Decoders | None] = (None, None)


def _decode(raw: bytes, limits: Limits, which: int) -> Any:
    """The document as decoder ``which`` (0 predictions, 1 labels) reads it, or None."""
    decoders = _decoders(limits)
    if decoders is None or len(raw) > limits.max_bytes:
        return None
    try:
        return decoders[which].decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):  # the latter: invalid UTF-8
        return None


def _ts(value: Any, default_ts: float, limits: Limits) -> float | None:
    if value is None:
        return default_ts
    if value.__class__ is str:
        return None  # ISO-8601: the validator parses it
    ts = float(value)
    return ts if -limits.ts_window <= ts - default_ts <= limits.ahead else None


def _scalar(value: Any) -> str | float:
    kind = value.__class__
    return value if kind is float else float(value) if kind is int else class_key(value)


def prediction(raw: bytes, default_ts: float, limits: Limits) -> Prediction | None:
    """The Prediction ``models.events.parse_prediction`` would return, or None to say
    "ask it" (the event is invalid, or uncommon in a way this path leaves to it)."""
    doc = _decode(raw, limits, 0)
    if doc is None or doc.id[0] == "\x00":  # NUL first: the join's own keys (validator)
        return None
    ts = _ts(doc.ts, default_ts, limits)
    if ts is None or len(doc.features) > limits.max_features:
        return None
    version = doc.version
    if version is None:
        version = "0"
    elif version.__class__ is not str:
        version = class_key(version)
        if len(version) > limits.max_string:  # as the validator: a number's class key
            return None
    scores = doc.scores  # keys are class keys already: class_key(str) is the str
    if scores is not None and (
            not scores or abs(sum(scores.values()) - 1.0) > SCORES_SUM_TOLERANCE):
        return None
    return Prediction(id=doc.id, model=doc.model, version=version, ts=ts,
                      features=doc.features, prediction=_scalar(doc.prediction),
                      scores=scores)


def label(raw: bytes, default_ts: float, limits: Limits) -> Label | None:
    """The Label ``models.events.parse_label`` would return, or None to say "ask it"."""
    doc = _decode(raw, limits, 1)
    if doc is None or doc.id[0] == "\x00":
        return None
    ts = _ts(doc.ts, default_ts, limits)
    if ts is None:
        return None
    return Label(id=doc.id, label=_scalar(doc.label), model=doc.model, ts=ts)
