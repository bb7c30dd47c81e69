"""Reference profiles: the baseline that online data-drift statistics compare against.

A :class:`ReferenceProfile` summarises a model version's training or validation data: one
:class:`FeatureProfile` per feature (quantile bins for numeric features, top-k categories
plus an "other" bin for categorical ones), the same for the prediction and label columns,
and the baseline metric the model reached on that data. Profiles are built from a file
(:func:`build_profile`, ``source="data"``) or, when none was published, from the first
predictions a version makes (:class:`ProfileBuilder`, ``source="bootstrap"``). Their JSON
form (:meth:`ReferenceProfile.to_json`) is the value of the compacted ``references`` topic.

Examples
--------
>>> import numpy as np
>>> import pandas as pd
>>> rng = np.random.default_rng(0)
>>> frame = pd.DataFrame({
...     "amount": rng.lognormal(3.0, 1.0, 1000).round(2),
...     "country": rng.choice(["DE", "FR", "US"], 1000, p=[0.5, 0.3, 0.2]),
...     "pred": rng.integers(0, 2, 1000),
...     "label": rng.integers(0, 2, 1000),
... })
>>> profile = build_profile(frame, "fraud", "3", prediction="pred", label="label", bins=4)
>>> profile.key, profile.source, profile.n, sorted(profile.features)
('fraud:3', 'data', 1000, ['amount', 'country'])
>>> amount = profile.features["amount"]
>>> amount.edges == tuple(np.quantile(frame["amount"], [0.25, 0.5, 0.75]))
True
>>> [round(edge, 2) for edge in amount.edges], amount.counts
([10.07, 18.63, 37.16], (250, 250, 250, 250))
>>> profile.features["country"].categories, profile.features["country"].counts
(('DE', 'FR', 'US'), (533, 264, 203, 0))
>>> profile.prediction.categories, profile.baseline
(('0', '1'), {'accuracy': 0.513})
>>> profile.features["amount"].bin_index(25.0), profile.features["country"].bin_index("IT")
(2, 3)
>>> ReferenceProfile.from_json(profile.to_json()) == profile
True
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import pathlib
import sys
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NoReturn

import numpy as np
import orjson
import pandas as pd

from models.errors import ConfigError
from models.events import class_key

__all__ = [
    "FORMAT",
    "MAX_BINS",
    "MAX_TOP_K",
    "FeatureProfile",
    "ProfileBuilder",
    "ReferenceProfile",
    "build_profile",
    "check_shape",
    "numbers_in_categoricals",
    "read_frame",
]

#: Version of the JSON form written by :meth:`ReferenceProfile.to_json`.
FORMAT = 1

#: Most bins per numeric feature and categories kept per categorical one: a profile's
#: size, and every window's counts, grow with them (a typo of 1e6 made a 27 MB profile).
MAX_BINS = 1000
MAX_TOP_K = 1000

_KINDS = ("numeric", "categorical")
_TASKS = ("classification", "regression")
_SOURCES = ("data", "bootstrap")
# Value types FeatureProfile.bin_counts bins without a call per value (bool is not int here).
_NUMERIC_TYPES = frozenset({float, int, type(None)})
_STR_TYPES = frozenset({str})
# True == 1, but their class keys differ ("true", "1"): values to bin one at a time.
_BOOL_TYPES = frozenset({bool, np.bool_})


def _as_float(value: Any) -> float | None:
    """A raw value as a number for a numeric feature; None when missing or not a number."""
    if value is None or isinstance(value, bool | np.bool_ | str | bytes):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _is_missing(value: Any) -> bool:
    """None or NaN (pandas' NA and NaT too): the value is absent."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and bool(np.isnan(value))


@dataclass(frozen=True)
class FeatureProfile:
    """The reference distribution of one column.

    Parameters
    ----------
    kind
        ``"numeric"`` or ``"categorical"``.
    counts
        Values per bin. Numeric: ``len(edges) + 1`` bins, bin ``i`` holding the values
        ``x`` with ``edges[i-1] <= x < edges[i]``. Categorical: ``len(categories) + 1``
        bins, the last one ("other") holding every category not listed.
    missing
        Missing values: None or NaN, and for a numeric column also values that are not
        numbers (strings, bools).
    edges
        Numeric only: interior bin edges, strictly increasing.
    categories
        Categorical only: class keys of the most frequent categories, most frequent first
        (ties by key).

    Examples
    --------
    >>> numeric = FeatureProfile("numeric", counts=(2, 5, 3), missing=1, edges=(0.5, 2.0))
    >>> numeric.n, numeric.bin_index(0.5), numeric.bin_index(None), numeric.bin_index("x")
    (11, 1, None, None)
    >>> numeric.proportions()
    array([0.2, 0.5, 0.3])
    >>> colour = FeatureProfile("categorical", counts=(6, 3, 1), missing=0,
    ...                         categories=("red", "true"))
    >>> colour.bin_index("red"), colour.bin_index(True), colour.bin_index("blue")
    (0, 1, 2)
    """

    kind: str
    counts: tuple[int, ...]
    missing: int
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        """Values profiled, missing ones included."""
        return sum(self.counts) + self.missing

    @cached_property
    def _index(self) -> dict[str, int]:
        # cached_property writes the instance __dict__ directly, which a frozen dataclass allows
        return {key: i for i, key in enumerate(self.categories)}

    def bin_index(self, value: Any) -> int | None:
        """The bin a single raw value falls in, or None when the value counts as missing.

        Numeric: ``bisect_right(edges, value)``, the same as
        ``np.searchsorted(edges, value, side="right")``. Categorical: the position of
        ``class_key(value)`` in ``categories``, else ``len(categories)`` ("other").
        """
        if self.kind == "numeric":
            if type(value) is float:  # the common case, without _as_float's checks
                return bisect.bisect_right(self.edges, value) if value == value else None
            number = _as_float(value)
            return None if number is None else bisect.bisect_right(self.edges, number)
        if type(value) is str:  # the common case: a string is never missing
            return self._index.get(value, len(self.categories))
        if _is_missing(value):
            return None
        return self._index.get(class_key(value), len(self.categories))

    def bin_counts(self, values: Sequence[Any],
                   types: AbstractSet[type] | None = None) -> tuple[list[int], int]:
        """Values per bin and missing values of many raw values: :meth:`bin_index` of each,
        counted, without a Python call per value in the common cases.

        ``types`` is ``set(map(type, values))`` when the caller has it. Numbers (with
        None) go through ``np.searchsorted``; categories through a dict lookup each
        (other than strings, each distinct value is binned once); a mix with bools
        takes :meth:`bin_index` value by value.

        >>> numeric = FeatureProfile("numeric", counts=(2, 5, 3), missing=1, edges=(0.5, 2.0))
        >>> numeric.bin_counts([0.1, 0.5, 2, None, 7.5, 1.0])
        ([1, 2, 2], 1)
        >>> numeric.bin_counts([0.1, "x", True])  # strings and bools are missing here
        ([1, 0, 0], 2)
        """
        size = len(self.counts)
        types = set(map(type, values)) if types is None else types
        if self.kind == "numeric" and types <= _NUMERIC_TYPES:
            return self.bin_floats(np.array(values, dtype=np.float64))  # None -> NaN
        if self.kind == "categorical" and types == _STR_TYPES:
            index, other = self._index, len(self.categories)
            return np.bincount([index.get(v, other) for v in values],
                               minlength=size).tolist(), 0
        if self.kind == "categorical" and not types & _BOOL_TYPES:
            # Few distinct values (classes as numbers): each binned once. Without bools,
            # equal values (1, 1.0) have equal class keys; a NaN misses the memo: missing.
            memo = {v: self.bin_index(v) for v in set(values)}
            known = [b for b in map(memo.get, values) if b is not None]
            return np.bincount(known, minlength=size).tolist(), len(values) - len(known)
        counts, missing = [0] * size, 0
        for value in values:
            i = self.bin_index(value)
            if i is None:
                missing += 1
            else:
                counts[i] += 1
        return counts, missing

    def bin_floats(self, array: np.ndarray) -> tuple[list[int], int]:
        """:meth:`bin_counts` of a numeric feature's float64 values, NaN missing.

        >>> FeatureProfile("numeric", counts=(2, 5, 3), missing=1, edges=(0.5, 2.0)).bin_floats(
        ...     np.array([0.1, 0.5, 2.0, np.nan]))
        ([1, 1, 1], 1)
        """
        present = array[~np.isnan(array)]
        bins = np.searchsorted(np.asarray(self.edges, dtype=np.float64), present, side="right")
        return np.bincount(bins, minlength=len(self.counts)).tolist(), len(array) - len(present)

    def bin_codes(self, strings: Sequence[str], codes: np.ndarray) -> list[int]:
        """:meth:`bin_counts` of a categorical feature's strings given as distinct
        ``strings`` and a code per value (an index into them): each distinct one looked
        up once.

        >>> FeatureProfile("categorical", counts=(3, 1, 0), missing=0,
        ...                categories=("a", "b")).bin_codes(["b", "z"], np.array([0, 1, 1]))
        [0, 1, 2]
        """
        index, other = self._index, len(self.categories)
        lookup = np.array([index.get(s, other) for s in strings], dtype=np.intp)
        return np.bincount(lookup[codes], minlength=len(self.counts)).tolist()  # type: ignore[no-any-return]

    def proportions(self) -> np.ndarray:
        """``counts / sum(counts)`` as float64, missing values excluded; zeros if all missing."""
        counts = np.asarray(self.counts, dtype=np.float64)
        total = counts.sum()
        return counts / total if total > 0 else np.zeros_like(counts)


@dataclass(frozen=True)
class ReferenceProfile:
    """The reference of one model version.

    Parameters
    ----------
    model, version
        The model version profiled.
    source
        ``"data"`` (built from a file) or ``"bootstrap"`` (from its first predictions).
    n
        Rows used.
    features
        Feature name -> profile.
    prediction, label
        Profiles of the prediction and label columns, when known.
    baseline
        Metrics on the reference rows: ``{"accuracy": ...}`` for classification,
        ``{"mae": ..., "rmse": ...}`` for regression; empty without labels.
    """

    model: str
    version: str
    source: str
    n: int
    features: dict[str, FeatureProfile]
    prediction: FeatureProfile | None = None
    label: FeatureProfile | None = None
    baseline: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``model:version``, the key of the ``references`` topic."""
        return f"{self.model}:{self.version}"

    def to_json(self) -> bytes:
        """Deterministic JSON (sorted keys), with format version ``"format": 1``."""
        doc = {
            "format": FORMAT,
            "model": self.model,
            "version": self.version,
            "source": self.source,
            "n": self.n,
            "features": {name: _feature_doc(p) for name, p in self.features.items()},
            "prediction": None if self.prediction is None else _feature_doc(self.prediction),
            "label": None if self.label is None else _feature_doc(self.label),
            "baseline": dict(self.baseline),
        }
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, raw: bytes) -> ReferenceProfile:
        """Decode and validate :meth:`to_json` output.

        Raises
        ------
        ConfigError
            Naming the malformed field, e.g. ``features.amount.edges``. Unknown fields are
            ignored.
        """
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"reference profile is not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ConfigError("reference profile must be a JSON object")
        if _required(doc, "format", "") != FORMAT or isinstance(doc["format"], bool):
            _fail("format", f"must be {FORMAT}, got {doc['format']!r}")
        features = _required(doc, "features", "")
        if not isinstance(features, dict):
            _fail("features", "must be an object")
        baseline = doc.get("baseline", {})
        if not isinstance(baseline, dict):
            _fail("baseline", "must be an object")
        for metric, value in baseline.items():
            if not _is_number(value) or not math.isfinite(value):
                _fail(f"baseline.{metric}", "must be a finite number")
            # An accuracy of 5 would put the threshold at 4.5: every full window fires.
            if metric == "accuracy" and not 0.0 <= value <= 1.0:
                _fail("baseline.accuracy", f"must be in [0, 1], got {value!r}")
            if metric in ("mae", "rmse") and value < 0.0:
                _fail(f"baseline.{metric}", f"must be >= 0, got {value!r}")
        source = _string(doc, "source", "")
        if source not in _SOURCES:
            _fail("source", f"must be one of {list(_SOURCES)}, got {source!r}")
        return cls(
            model=_string(doc, "model", ""),
            version=_string(doc, "version", ""),
            source=source,
            n=_count(doc, "n", ""),
            features={name: _feature(p, f"features.{name}") for name, p in features.items()},
            prediction=_optional_feature(doc, "prediction"),
            label=_optional_feature(doc, "label"),
            baseline={metric: float(value) for metric, value in baseline.items()},
        )

    def fingerprint(self) -> str:
        """Short stable hash of :meth:`to_json` (16 hex digits), to tell profiles apart."""
        return hashlib.blake2b(self.to_json(), digest_size=8).hexdigest()


def _feature_doc(profile: FeatureProfile) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kind": profile.kind,
        "counts": list(profile.counts),
        "missing": profile.missing,
    }
    if profile.kind == "numeric":
        doc["edges"] = list(profile.edges)
    else:
        doc["categories"] = list(profile.categories)
    return doc


def _fail(path: str, message: str) -> NoReturn:
    raise ConfigError(f"reference profile field '{path}' {message}")


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _required(doc: dict[str, Any], name: str, prefix: str) -> Any:
    if name not in doc:
        _fail(_path(prefix, name), "is required")
    return doc[name]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string(doc: dict[str, Any], name: str, prefix: str) -> str:
    value = _required(doc, name, prefix)
    if not isinstance(value, str) or not value:
        _fail(_path(prefix, name), "must be a non-empty string")
    return value


def _count(doc: dict[str, Any], name: str, prefix: str) -> int:
    value = _required(doc, name, prefix)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        _fail(_path(prefix, name), f"must be a non-negative integer, got {value!r}")
    return value


def _optional_feature(doc: dict[str, Any], name: str) -> FeatureProfile | None:
    value = doc.get(name)
    return None if value is None else _feature(value, name)


def _feature(doc: Any, path: str) -> FeatureProfile:
    if not isinstance(doc, dict):
        _fail(path, "must be an object")
    kind = _required(doc, "kind", path)
    if kind not in _KINDS:
        _fail(f"{path}.kind", f"must be one of {list(_KINDS)}, got {kind!r}")
    counts = _required(doc, "counts", path)
    if not isinstance(counts, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
    ):
        _fail(f"{path}.counts", "must be a list of non-negative integers")
    missing = _count(doc, "missing", path)
    edges = doc.get("edges", [])
    categories = doc.get("categories", [])
    if not isinstance(edges, list) or not all(
        _is_number(e) and math.isfinite(e) for e in edges
    ):
        _fail(f"{path}.edges", "must be a list of finite numbers")
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        _fail(f"{path}.categories", "must be a list of strings")
    if kind == "numeric":
        if categories:
            _fail(f"{path}.categories", "must be empty for a numeric feature")
        if any(a >= b for a, b in itertools.pairwise(edges)):
            _fail(f"{path}.edges", "must be increasing")
        bins = len(edges) + 1
    else:
        if edges:
            _fail(f"{path}.edges", "must be empty for a categorical feature")
        if len(set(categories)) != len(categories):
            _fail(f"{path}.categories", "must not repeat a category")
        bins = len(categories) + 1
    if len(counts) != bins:
        _fail(f"{path}.counts", f"must have {bins} entries (one per bin), got {len(counts)}")
    return FeatureProfile(
        kind=kind,
        counts=tuple(counts),
        missing=missing,
        edges=tuple(float(e) for e in edges),
        categories=tuple(categories),
    )


# -- building -------------------------------------------------------------------------


def _is_numeric_column(series: pd.Series) -> bool:
    dtype = series.dtype
    return bool(pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype))


def _numbers(series: pd.Series) -> np.ndarray:
    """A column as float64, NaN where a value is missing or not a number."""
    if _is_numeric_column(series):
        return np.asarray(series.to_numpy(dtype=np.float64, na_value=np.nan))
    numbers = (_as_float(v) for v in series.tolist())
    return np.fromiter((np.nan if x is None else x for x in numbers), np.float64, len(series))


def _keys(series: pd.Series) -> np.ndarray:
    """Class keys of a column without missing values (object array)."""
    if series.dtype == object or isinstance(series.dtype, pd.CategoricalDtype):
        # pandas hashes object values by equality, merging 1, 1.0 and True: key each value
        return np.array([class_key(v) for v in series.tolist()], dtype=object)
    codes, uniques = pd.factorize(series)
    keys = np.array([class_key(v) for v in uniques.tolist()], dtype=object)
    return keys[codes] if keys.size else keys


def _numeric_profile(series: pd.Series, bins: int) -> FeatureProfile:
    values = _numbers(series)
    present = values[~np.isnan(values)]
    finite = present[np.isfinite(present)]  # +-inf fall in the end bins, not into edges
    if finite.size:
        quantiles = np.arange(1, bins) / bins
        with np.errstate(over="ignore", invalid="ignore"):
            edges = np.quantile(finite, quantiles)
        if not np.isfinite(edges).all():  # interpolating across +-1e308 overflows: take values
            edges = np.quantile(finite, quantiles, method="inverted_cdf")
        edges = np.unique(edges)
    else:
        edges = np.empty(0, dtype=np.float64)
    counts = np.bincount(np.searchsorted(edges, present, side="right"), minlength=edges.size + 1)
    return FeatureProfile(
        kind="numeric",
        counts=tuple(counts.tolist()),
        missing=int(values.size - present.size),
        edges=tuple(edges.tolist()),
    )


def _categorical_profile(series: pd.Series, top_k: int) -> FeatureProfile:
    present = series[series.notna().to_numpy()]
    frequencies = pd.Series(_keys(present), dtype=object).value_counts()
    ranked = sorted(zip(frequencies.index.tolist(), frequencies.tolist(), strict=True),
                    key=lambda item: (-item[1], item[0]))
    top = ranked[:top_k]
    other = sum(count for _, count in ranked[top_k:])
    return FeatureProfile(
        kind="categorical",
        counts=(*(int(count) for _, count in top), int(other)),
        missing=int(len(series) - len(present)),
        categories=tuple(str(key) for key, _ in top),
    )


def _baseline(pred: pd.Series, label: pd.Series, task: str) -> dict[str, float]:
    if task == "classification":
        both = (pred.notna() & label.notna()).to_numpy()
        if not both.any():
            return {}
        return {"accuracy": float(np.mean(_keys(pred[both]) == _keys(label[both])))}
    p, y = _numbers(pred), _numbers(label)
    both = np.isfinite(p) & np.isfinite(y)
    if not both.any():
        return {}
    error = p[both] - y[both]
    return {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error**2)))}


def check_shape(bins: int, top_k: int) -> None:
    """Raise ConfigError unless ``bins`` (2 to MAX_BINS) and ``top_k`` (1 to MAX_TOP_K) are
    integers a profile can be built with.

    >>> check_shape(10, 20)
    >>> check_shape(10, 5000)
    Traceback (most recent call last):
    models.errors.ConfigError: top_k must be an integer from 1 to 1000, got 5000
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
        raise ConfigError(f"bins must be an integer from 2 to {MAX_BINS}, got {bins!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise ConfigError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")


def build_profile(
    frame: pd.DataFrame,
    model: str,
    version: str,
    *,
    prediction: str | None = None,
    label: str | None = None,
    task: str = "classification",
    bins: int = 10,
    top_k: int = 20,
    source: str = "data",
    features: list[str] | None = None,
) -> ReferenceProfile:
    """Profile a frame of reference rows.

    Parameters
    ----------
    frame
        One row per reference example.
    model, version
        The model version the data belongs to.
    prediction, label
        Columns holding the model's prediction and the true label, if any.
    task
        ``"classification"`` (prediction and label are categorical, baseline accuracy) or
        ``"regression"`` (numeric, baseline MAE and RMSE).
    bins
        Quantile bins per numeric column (fewer when quantiles coincide).
    top_k
        Categories kept per categorical column; the rest share the "other" bin.
    source
        ``"data"`` or ``"bootstrap"``.
    features
        Feature columns; by default every column except ``prediction`` and ``label``.

    Notes
    -----
    A column is numeric when its dtype is numeric and not bool; otherwise its values are
    mapped with :func:`models.events.class_key` (``1``, ``True``, ``"DE"`` become ``"1"``,
    ``"true"``, ``"DE"``). Numeric edges are the ``1/bins .. (bins-1)/bins`` quantiles of
    the finite values, de-duplicated. The baseline uses the rows where both prediction and
    label are present (finite, for regression).

    Raises
    ------
    ConfigError
        For an empty frame, a column that is not in it, or a bad parameter.
    """
    if not isinstance(model, str) or not model:
        raise ConfigError("model must be a non-empty string")
    if not isinstance(version, str) or not version:
        raise ConfigError("version must be a non-empty string")
    if task not in _TASKS:
        raise ConfigError(f"task must be one of {list(_TASKS)}, got {task!r}")
    if source not in _SOURCES:
        raise ConfigError(f"source must be one of {list(_SOURCES)}, got {source!r}")
    check_shape(bins, top_k)
    if len(frame) == 0:
        raise ConfigError("reference frame has no rows")
    if features is None:
        features = [c for c in frame.columns if c not in (prediction, label)]

    def column(name: str) -> pd.Series:
        if name not in frame.columns:
            raise ConfigError(f"column {name!r} is not in the reference frame")
        series = frame[name]
        if isinstance(series, pd.DataFrame):
            raise ConfigError(f"column {name!r} appears more than once in the reference frame")
        return series

    def profile(series: pd.Series, numeric: bool) -> FeatureProfile:
        return _numeric_profile(series, bins) if numeric else _categorical_profile(series, top_k)

    pred = None if prediction is None else column(prediction)
    true = None if label is None else column(label)
    regression = task == "regression"
    for role, name, series in (("prediction", prediction, pred), ("label", label, true)):
        # A non-number counts as missing (as for a numeric feature); a column with no
        # number at all is the wrong column, or the wrong task.
        if regression and series is not None and np.isnan(_numbers(series)).all():
            present = series.dropna()
            found = f"; its first value is {present.iloc[0]!r}" if len(present) else ""
            raise ConfigError(f"{role} column {name!r} holds no numbers, which a regression "
                              f"needs{found}")
    profiles = {}
    for name in features:
        series = column(name)
        profiles[str(name)] = profile(series, _is_numeric_column(series))
    return ReferenceProfile(
        model=model,
        version=version,
        source=source,
        n=len(frame),
        features=profiles,
        prediction=None if pred is None else profile(pred, regression),
        label=None if true is None else profile(true, regression),
        baseline={} if pred is None or true is None else _baseline(pred, true, task),
    )


def numbers_in_categoricals(frame: pd.DataFrame, profile: ReferenceProfile,
                            least: float = 0.5) -> dict[str, float]:
    """Features profiled as categorical whose values are mostly numbers written as text
    (or decimals): feature -> that share of its present values, when at least ``least``.

    A CSV column of numbers with one stray ``"?"`` is read as text, so it is profiled as
    categories; live events send numbers, which its categories never match.

    >>> frame = pd.DataFrame({"x": ["1.5", "2", "?", "4"], "c": ["a", "b", "a", "1"]})
    >>> numbers_in_categoricals(frame, build_profile(frame, "m", "1"))
    {'x': 0.75}
    """
    out: dict[str, float] = {}
    for name, feature in profile.features.items():
        if feature.kind != "categorical" or name not in frame.columns:
            continue
        present = [v for v in frame[name].tolist() if not _is_missing(v)]
        numbers = sum(1 for v in present if _written_number(v))
        if present and numbers / len(present) >= least:
            out[name] = numbers / len(present)
    return out


def _written_number(value: Any) -> bool:
    """A number in text, or a number type a numeric feature's values are not (Decimal)."""
    if isinstance(value, bool | np.bool_ | int | float | np.number):
        return False  # a real number column is numeric already; a bool is a category
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def read_frame(path: str | pathlib.Path) -> pd.DataFrame:
    """Read reference data from ``.csv`` or ``.parquet`` / ``.pq``.

    Raises
    ------
    ConfigError
        Naming the path, for another extension or a file that cannot be read.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ConfigError(f"reference data '{path}' must be a .csv, .parquet or .pq file")
    try:
        return pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"reference data '{path}' cannot be read: {exc}") from exc


class ProfileBuilder:
    """Bootstrap: the first ``size`` predictions of a version become its reference.

    Used when no profile was published for the version. Raw values are buffered in plain
    lists (the builder is part of the worker's pickled state) until ``size`` predictions
    have been added; then the profile is built with :func:`build_profile`
    (``source="bootstrap"``) and the buffer is freed.

    Parameters
    ----------
    model, version
        The model version.
    size
        Predictions that make up the reference.
    task, bins, top_k
        As for :func:`build_profile`.
    max_features
        Most features tracked: the first ones seen, in order; later ones are ignored.

    Notes
    -----
    A feature is numeric when every present value is an int or float (bools are not), so a
    feature that was always missing gets an empty numeric profile. A feature first seen
    after the first row counts as missing in the rows before.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(3)
    >>> builder = ProfileBuilder("fraud", "3", size=100, bins=4)
    >>> for i in range(100):
    ...     profile = builder.add({"amount": round(rng.expovariate(0.1), 2),
    ...                            "country": rng.choice(["DE", "FR"])}, rng.random() < 0.2)
    >>> builder.done, builder.n, profile.source, profile.features["country"].counts
    (True, 100, 'bootstrap', (53, 47, 0))
    >>> profile.prediction.categories
    ('false', 'true')
    >>> builder.add({"amount": 1.0}, False) is None
    True
    """

    def __init__(
        self,
        model: str,
        version: str,
        size: int = 10_000,
        task: str = "classification",
        bins: int = 10,
        top_k: int = 20,
        max_features: int = 100,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ConfigError("model must be a non-empty string")
        if not isinstance(version, str) or not version:
            raise ConfigError("version must be a non-empty string")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"size must be a positive integer, got {size!r}")
        if task not in _TASKS:
            raise ConfigError(f"task must be one of {list(_TASKS)}, got {task!r}")
        check_shape(bins, top_k)
        if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 1:
            raise ConfigError(f"max_features must be a positive integer, got {max_features!r}")
        self.model = model
        self.version = version
        self.size = size
        self.task = task
        self.bins = bins
        self.top_k = top_k
        self.max_features = max_features
        self._n = 0
        self._columns: dict[str, list[Any]] = {}
        self._predictions: list[Any] = []

    @property
    def done(self) -> bool:
        """True once the profile has been built."""
        return self._n >= self.size

    @property
    def n(self) -> int:
        """Predictions absorbed (at most ``size``)."""
        return self._n

    def add(self, features: dict[str, Any], prediction: Any) -> ReferenceProfile | None:
        """Buffer one prediction; returns the profile when it is the ``size``-th, else None."""
        if self.done:
            return None
        columns = self._columns
        for name in features:
            if name not in columns and len(columns) < self.max_features:
                columns[name] = [None] * self._n
        for name, values in columns.items():
            value = features.get(name)
            # interned strings are pickled once and referenced after: a compact buffer
            values.append(sys.intern(value) if type(value) is str else value)
        self._predictions.append(sys.intern(prediction) if type(prediction) is str else prediction)
        self._n += 1
        if not self.done:
            return None
        return self._build()

    def _build(self) -> ReferenceProfile:
        data = {name: _buffer_column(values) for name, values in self._columns.items()}
        prediction = "prediction"
        while prediction in data:
            prediction = f"_{prediction}"
        data[prediction] = _buffer_column(self._predictions)
        frame = pd.DataFrame(data)
        self._columns, self._predictions = {}, []
        return build_profile(
            frame, self.model, self.version, prediction=prediction, task=self.task,
            bins=self.bins, top_k=self.top_k, source="bootstrap",
            features=[name for name in data if name != prediction],
        )


def _buffer_column(values: list[Any]) -> pd.Series:
    """Numeric (float64) when every present value is an int or float, bools excluded."""
    numeric = all(
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
        for v in values if v is not None
    )
    if numeric:
        return pd.Series(np.array(values, dtype=np.float64))
    return pd.Series(values, dtype=object)
