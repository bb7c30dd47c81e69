"""Runs as columns: how the records topic carries predictions and outcomes to the model stage.

The join sends a model version's predictions from one input partition, in offset order,
as one :class:`PredictionRun` rather than a record each, when every prediction of the run
names the same features. Each feature is one column:

=================  ==============================================================
column             when
=================  ==============================================================
float64 array      every value is a float (JSON: base64 of the little-endian bytes)
:class:`Categories`  every value is a string: the distinct strings and an int32 code
                   per prediction (JSON: the strings, base64 of the codes)
list               anything else (ints, bools, nulls, a mix): the values themselves
=================  ==============================================================

So the model stage decodes a 20-feature prediction without a Python object per value
and bins a column with one numpy call, where one record per prediction meant decoding
its event again into a dict of 20 objects (about 3 us) and transposing those dicts into
columns before binning (about 2.4 us; README, Performance). Every value comes back equal
to, and of the same type as, what the join decoded: floats travel as their 64 bits.

Examples
--------
>>> rows = [{"x": 0.5, "c": "DE", "n": 1}, {"x": 2.25, "c": "FR", "n": None},
...         {"x": 0.1, "c": "DE", "n": 3}]
>>> columns = FeatureColumns.from_rows(rows)
>>> columns.columns["x"], columns.columns["n"]
(array([0.5 , 2.25, 0.1 ]), [1, None, 3])
>>> columns.columns["c"]
Categories(values=['DE', 'FR'], codes=array([0, 1, 0], dtype=int32))
>>> run = PredictionRun("1", "p0", [7, 8, 9], [1.0, 2.0, 3.0], ["a", "b", "a"],
...                     [0.9, None, 0.6], columns)
>>> doc = run.encode()
>>> doc[7]["x"]
['f', 'AAAAAAAA4D8AAAAAAAACQJqZmZmZmbk/']
>>> again = PredictionRun.decode(doc)
>>> again.features.rows(1, 3) == rows[1:]
True
>>> FeatureColumns.from_rows([{"x": 1.0}, {"y": 1.0}]) is None  # not the same names
True

A batch's outcomes of a model version from one join partition travel likewise as one
:class:`OutcomeRun`: a list per field, where one record per outcome meant a list of
six fields and its envelope per outcome, each decoded into a ``ModelRecord``.

>>> outcomes = OutcomeRun("1", "o0", 4, [0, 2], [10.0, 11.0], ["a", "b"], ["a", "a"],
...                       [0.9, 0.2], [0.9, 0.8], [2.5, 0.0])
>>> OutcomeRun.decode(outcomes.encode()) == outcomes
True
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter, lt
from typing import Any

import numpy as np

from models.errors import StateError

__all__ = ["Categories", "Column", "FeatureColumns", "OutcomeRun", "PredictionRun",
           "column_values", "transpose"]

_FLOAT = np.dtype("<f8")
_CODE = np.dtype("<i4")
_FLOATS = frozenset({float})
_STRS = frozenset({str})


@dataclass(frozen=True, slots=True)
class Categories:
    """A column of strings: the distinct strings, first seen first, and a code per row."""

    values: list[str]
    codes: np.ndarray  # int32, one per row: an index into values


Column = np.ndarray | Categories | list[Any]


def column_values(column: Column, start: int = 0, end: int | None = None) -> list[Any]:
    """The values of rows ``start:end`` of ``column`` as the join decoded them.

    >>> column_values(Categories(["a", "b"], np.array([1, 0, 1], dtype=np.int32)), 1)
    ['a', 'b']
    """
    if isinstance(column, np.ndarray):
        return column[start:end].tolist()  # type: ignore[no-any-return]
    if isinstance(column, Categories):
        return list(map(column.values.__getitem__, column.codes[start:end].tolist()))
    return column[start:end]


def transpose(rows: Sequence[Mapping[str, Any]],
              names: Collection[str]) -> list[Sequence[Any]] | None:
    """The values of each of ``names`` in ``rows``, read by ``operator.itemgetter`` and
    transposed by ``zip``, in C, rather than by a lookup per value in Python; None when
    a row lacks one of them.

    >>> transpose([{"a": 1, "b": 2}, {"a": 3, "b": 4}], ["a", "b"])
    [(1, 3), (2, 4)]
    >>> transpose([{"a": 1}, {"b": 2}], ["a"]) is None
    True
    """
    try:
        if len(names) < 2:  # itemgetter of one name returns no tuple
            return [[row[name] for row in rows] for name in names]
        return list(zip(*map(itemgetter(*names), rows), strict=True))
    except KeyError:
        return None


def _column(values: Sequence[Any]) -> Column:
    types = set(map(type, values))
    if types == _FLOATS:
        return np.array(values, dtype=_FLOAT)
    if types == _STRS:
        index = dict.fromkeys(values, 0)  # the distinct strings, first seen first
        for code, value in enumerate(index):
            index[value] = code
        return Categories(list(index), np.fromiter(map(index.__getitem__, values),
                                                   dtype=_CODE, count=len(values)))
    return list(values)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


def _array(text: str, dtype: np.dtype[Any], n: int, name: str) -> np.ndarray:
    try:
        array = np.frombuffer(base64.b64decode(text, validate=True), dtype=dtype)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise StateError(f"records message: column {name!r} is not base64 of "
                         f"{dtype.name} values: {exc}") from None
    if len(array) != n:
        raise StateError(f"records message: column {name!r} has {len(array)} values, not {n}")
    return array


class FeatureColumns:
    """The features of ``n`` predictions that all name the same features, a column each.

    Parameters
    ----------
    columns
        Feature name -> :data:`Column` of ``n`` values, in the order the first
        prediction named them.
    n
        Predictions.
    """

    __slots__ = ("columns", "n")

    def __init__(self, columns: dict[str, Column], n: int) -> None:
        self.columns = columns
        self.n = n

    def __len__(self) -> int:
        return self.n

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> FeatureColumns | None:
        """The columns of ``rows``; None when not every row has the same feature names."""
        if not rows:
            return None
        names = tuple(rows[0])
        if set(map(len, rows)) != {len(names)}:
            return None
        table = transpose(rows, names)  # None: as many names, not the same ones
        if table is None:
            return None
        return cls({name: _column(values) for name, values in zip(names, table, strict=True)},
                   len(rows))

    def slice(self, start: int, end: int) -> FeatureColumns:
        """Rows ``start:end`` (arrays as views)."""
        if start == 0 and end >= self.n:
            return self
        columns: dict[str, Column] = {}
        for name, column in self.columns.items():
            if isinstance(column, Categories):
                columns[name] = Categories(column.values, column.codes[start:end])
            else:
                columns[name] = column[start:end]
        return FeatureColumns(columns, max(0, min(end, self.n) - start))

    def rows(self, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
        """Rows ``start:end`` as the dicts the join decoded."""
        stop = self.n if end is None else min(end, self.n)
        if not self.columns:
            return [{} for _ in range(start, stop)]
        names = list(self.columns)
        table = [column_values(column, start, stop) for column in self.columns.values()]
        return [dict(zip(names, values, strict=True)) for values in zip(*table, strict=True)]

    def encode(self) -> dict[str, list[Any]]:
        """JSON-ready: ``{name: ["f", base64] | ["s", strings, base64] | ["j", values]}``."""
        doc: dict[str, list[Any]] = {}
        for name, column in self.columns.items():
            if isinstance(column, np.ndarray):
                doc[name] = ["f", _b64(column)]
            elif isinstance(column, Categories):
                doc[name] = ["s", column.values, _b64(column.codes)]
            else:
                doc[name] = ["j", column]
        return doc

    @classmethod
    def decode(cls, doc: Mapping[str, Sequence[Any]], n: int) -> FeatureColumns:
        """The inverse of :meth:`encode`; raises StateError on a column of another length."""
        columns: dict[str, Column] = {}
        for name, spec in doc.items():
            kind = spec[0]
            if kind == "f":
                columns[name] = _array(spec[1], _FLOAT, n, name)
            elif kind == "s":
                codes = _array(spec[2], _CODE, n, name)
                if n and not 0 <= int(codes.min()) <= int(codes.max()) < len(spec[1]):
                    raise StateError(f"records message: column {name!r} has codes out of range")
                columns[name] = Categories(list(spec[1]), codes)
            elif kind == "j" and len(spec[1]) == n:
                columns[name] = spec[1]
            else:
                raise StateError(f"records message: column {name!r} is not a column of {n}")
        return cls(columns, n)


@dataclass(slots=True)
class PredictionRun:
    """Consecutive predictions of one model version from one source partition.

    Prediction ``i`` is the record ``("p", version, source, (offsets[i], 0), [ts[i],
    features row i, predictions[i], confidences[i]])`` of :class:`models.join.ModelRecord`;
    offsets increase.
    """

    version: str
    source: str
    offsets: list[int]
    ts: list[float]
    predictions: list[Any]
    confidences: list[float | None]
    features: FeatureColumns

    def __len__(self) -> int:
        return len(self.offsets)

    def encode(self) -> list[Any]:
        """The run's records-message entry: ``["c", version, source, offsets, ts,
        predictions, confidences, features]``."""
        return ["c", self.version, self.source, self.offsets, self.ts, self.predictions,
                self.confidences, self.features.encode()]

    @classmethod
    def decode(cls, entry: Sequence[Any]) -> PredictionRun:
        """The inverse of :meth:`encode`; raises StateError when the entry does not hold."""
        try:
            _, version, source, offsets, ts, predictions, confidences, features = entry
        except ValueError:
            raise StateError(f"records message: a run entry has {len(entry)} fields, "
                             "not 8") from None
        n = len(offsets)
        if not len(ts) == len(predictions) == len(confidences) == n:
            raise StateError(f"records message: run of {source} has columns of unequal length")
        if not all(map(lt, offsets, offsets[1:])):
            raise StateError(f"records message: run of {source} has offsets out of order")
        return cls(version, source, offsets, ts, predictions, confidences,
                   FeatureColumns.decode(features, n))


@dataclass(slots=True)
class OutcomeRun:
    """Consecutive outcomes of one model version from one batch of one join partition.

    Outcome ``i`` is the record ``("o", version, source, (batch, subs[i]), [ts[i],
    predictions[i], labels[i], p_labels[i], confidences[i], delays[i]])`` of
    :class:`models.join.ModelRecord`; subs increase.
    """

    version: str
    source: str
    batch: int
    subs: list[int]
    ts: list[float]
    predictions: list[Any]
    labels: list[Any]
    p_labels: list[float | None]
    confidences: list[float | None]
    delays: list[float]

    def __len__(self) -> int:
        return len(self.subs)

    def encode(self) -> list[Any]:
        """The run's records-message entry: ``["oc", version, source, batch, subs, ts,
        predictions, labels, p_labels, confidences, delays]``."""
        return ["oc", self.version, self.source, self.batch, self.subs, self.ts,
                self.predictions, self.labels, self.p_labels, self.confidences, self.delays]

    @classmethod
    def decode(cls, entry: Sequence[Any]) -> OutcomeRun:
        """The inverse of :meth:`encode`; raises StateError when the entry does not hold."""
        if len(entry) != 11:
            raise StateError(f"records message: an outcome run entry has {len(entry)} fields, "
                             "not 11")
        _, version, source, batch, subs, *columns = entry
        if not all(isinstance(column, list) and len(column) == len(subs)
                   for column in columns):
            raise StateError(f"records message: outcome run of {source} has columns of "
                             "unequal length")
        if not all(map(lt, subs, subs[1:])):
            raise StateError(f"records message: outcome run of {source} has positions out "
                             "of order")
        return cls(version, source, batch, subs, *columns)

    @staticmethod
    def halves(entry: list[Any]) -> list[list[Any]]:
        """An encoded run (:meth:`encode`) of two or more outcomes as two runs, in order."""
        half = len(entry[4]) // 2
        return [[*entry[:4], *(column[:half] for column in entry[4:])],
                [*entry[:4], *(column[half:] for column in entry[4:])]]
