"""Online data drift: each window's histograms against the version's reference profile.

Per event the work is one bin lookup per tracked feature (a counter increment); the
statistics are evaluated once per window — by count or by event time, whichever closes
first — never a test per event (DESIGN.md section 5).

Statistics, from the reference proportions ``p`` and the window proportions ``q`` over
the reference's bins (missing values excluded, rates reported apart):

=============  ================================================================
``psi``        population stability index, sum (q - p) ln(q / p), both floored at 1e-4
``js``         Jensen-Shannon distance, base 2 (0 = same, 1 = disjoint)
``ks``         binned Kolmogorov-Smirnov distance, max |cdf_q - cdf_p| (numeric)
``chi2``       Pearson's chi-square statistic of the window counts vs p (categorical)
``unseen``     share of the window in categories the reference never saw (categorical;
               0 when the reference has an "other" bin, which hides them)
``missing``    share of the window that is missing
=============  ================================================================

Decisions are on effect size, not p-values: a feature drifts in a window when its chosen
statistic (``psi`` by default) reaches the threshold (0.1 by default: the usual "moderate
shift" level; a 0.5 standard-deviation mean shift of a normal feature gives about 0.22),
and it counts only after ``consecutive`` such windows. Under no drift, PSI of a
2,000-event window over 10 bins is about (bins - 1) / window = 0.0045, twenty times below
0.1, so adding features adds no measurable false alarms; every drifting feature of a window
goes into one event, and each feature re-arms only after a window back under threshold.

Examples
--------
>>> import random
>>> from models.reference import build_profile
>>> import pandas as pd
>>> rng = random.Random(0)
>>> ref = build_profile(pd.DataFrame({"x": [rng.gauss(0, 1) for _ in range(5000)]}),
...                     "m", "1", features=["x"])
>>> mon = DataDriftMonitor(DriftConfig(window=1000, consecutive=2), reference=ref)
>>> fired = []
>>> for i in range(6000):
...     shift = 1.0 if i >= 3000 else 0.0
...     for reason in mon.add_prediction(float(i), {"x": rng.gauss(shift, 1)}, None):
...         fired.append((i + 1, reason["feature"], reason["statistic"]))
>>> fired
[(5000, 'x', 'psi')]
>>> round(mon.last["features"]["x"]["psi"], 2)
1.02
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon

from models.columns import Categories, Column, FeatureColumns, column_values, transpose
from models.reference import (
    MAX_BINS,
    MAX_TOP_K,
    FeatureProfile,
    ProfileBuilder,
    ReferenceProfile,
)

__all__ = [
    "STATISTICS",
    "DataDriftMonitor",
    "DriftConfig",
    "FeatureWindow",
    "chi_square",
    "js_distance",
    "ks_distance",
    "psi",
]

#: Statistics each kind of distribution reports, besides ``missing``.
STATISTICS = {"numeric": ("psi", "js", "ks"), "categorical": ("psi", "js", "chi2", "unseen")}
FLOOR = 1e-4
_NONE = type(None)


def psi(p: np.ndarray, q: np.ndarray, floor: float = FLOOR) -> float:
    """Population stability index of proportions ``q`` against ``p``.

    >>> round(psi(np.array([0.5, 0.5]), np.array([0.25, 0.75])), 6)
    0.274653
    """
    pf, qf = np.maximum(p, floor), np.maximum(q, floor)
    return float(np.sum((qf - pf) * np.log(qf / pf)))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2, in [0, 1].

    >>> js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    1.0

    An empty distribution (all zeros) is disjoint from any other: 1.0, not scipy's NaN.
    """
    if not p.sum() or not q.sum():
        return 0.0 if not p.sum() and not q.sum() else 1.0
    return float(jensenshannon(p, q, base=2))


def ks_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Largest gap between the two binned cumulative distributions.

    >>> ks_distance(np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5]))
    0.5
    """
    return float(np.max(np.abs(np.cumsum(p) - np.cumsum(q))))


def chi_square(p: np.ndarray, counts: np.ndarray, floor: float = FLOOR) -> float:
    """Pearson's chi-square of observed ``counts`` against proportions ``p``.

    >>> chi_square(np.array([0.5, 0.5]), np.array([30, 10]))
    10.0

    A bin empty in both (the "other" bin of a reference that kept every category) says
    nothing and adds nothing; one empty in the reference only is floored, not infinite:

    >>> chi_square(np.array([0.5, 0.5, 0.0]), np.array([500, 500, 0]))
    0.0
    >>> round(chi_square(np.array([0.5, 0.5, 0.0]), np.array([499, 500, 1])), 4)
    8.102
    """
    used = (p > 0) | (counts > 0)
    expected = np.maximum(p[used], floor) * counts.sum()
    return float(np.sum((counts[used] - expected) ** 2 / expected))


@dataclass(frozen=True)
class DriftConfig:
    """How data drift is measured and decided (the policy's ``drift_*`` settings).

    Parameters
    ----------
    window, window_seconds
        A window closes after ``window`` predictions or ``window_seconds`` of event time.
    statistic, threshold
        The statistic that decides, and the effect size at which a window drifts.
    consecutive
        Drifting windows in a row before a feature counts.
    reference_size
        Predictions that become the reference when no profile is published.
    bins, top_k, max_features
        Shape of a bootstrapped reference; ``max_features`` also caps the features of a
        published one that are tracked (the first by name: a profile's JSON holds them
        sorted).
    min_labels
        Labels a window needs before label drift is judged.
    """

    window: int = 2000
    window_seconds: float = 3600.0
    statistic: str = "psi"
    threshold: float = 0.1
    consecutive: int = 2
    reference_size: int = 10_000
    bins: int = 10
    top_k: int = 20
    max_features: int = 100
    min_labels: int = 200
    task: str = "classification"

    def __post_init__(self) -> None:
        for name in ("window", "consecutive", "reference_size", "top_k", "max_features",
                     "min_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        if not 2 <= self.bins <= MAX_BINS:
            raise ValueError(f"bins must be from 2 to {MAX_BINS}")
        if self.top_k > MAX_TOP_K:
            raise ValueError(f"top_k must be at most {MAX_TOP_K}")
        for name, most in (("reference_size", 1_000_000), ("max_features", 10_000)):
            if getattr(self, name) > most:  # buffered, or a window of counts each
                raise ValueError(f"{name} must be at most {most:,}")
        if self.statistic not in ("psi", "js", "ks"):
            raise ValueError("statistic must be one of psi, js, ks")
        for name in ("threshold", "window_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


class FeatureWindow:
    """Counts of one feature (or the prediction, or the label) in the current window."""

    def __init__(self, profile: FeatureProfile) -> None:
        self.profile = profile
        self.reference = profile.proportions()
        self.counts = [0] * len(profile.counts)
        self.missing = 0
        self.streak = 0
        self.latched = False

    @property
    def n(self) -> int:
        return sum(self.counts) + self.missing

    def add(self, value: Any) -> None:
        i = self.profile.bin_index(value)
        if i is None:
            self.missing += 1
        else:
            self.counts[i] += 1

    def add_many(self, values: Sequence[Any], types: AbstractSet[type] | None = None) -> None:
        """:meth:`add` of each value, counted in bulk (``types``: ``set(map(type, values))``)."""
        self._add_counts(*self.profile.bin_counts(values, types))

    def add_column(self, column: Column) -> None:
        """:meth:`add` of each value of a run's column (:mod:`models.columns`): a float
        array of a numeric feature, or the codes of a categorical one's strings, binned
        with a numpy call; any other pairing value by value as :meth:`add_many`."""
        profile = self.profile
        if isinstance(column, np.ndarray) and profile.kind == "numeric":
            counts, missing = profile.bin_floats(column)
        elif isinstance(column, Categories) and profile.kind == "categorical":
            counts, missing = profile.bin_codes(column.values, column.codes), 0
        else:
            counts, missing = profile.bin_counts(column_values(column))
        self._add_counts(counts, missing)

    def _add_counts(self, counts: list[int], missing: int) -> None:
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.missing += missing

    def evaluate(self) -> dict[str, float]:
        """Statistics of the window so far; then the window starts afresh."""
        counts = np.asarray(self.counts, dtype=np.float64)
        total = counts.sum()
        out = {"missing": self.missing / max(self.n, 1)}
        # A reference with no values (a column empty in the training data, or missing in
        # every bootstrap prediction) has no distribution to compare with: not judged.
        if total > 0 and self.reference.any():
            q = counts / total
            p = self.reference
            out["psi"] = psi(p, q)
            out["js"] = js_distance(p, q)
            if self.profile.kind == "numeric":
                out["ks"] = ks_distance(p, q)
            else:
                out["chi2"] = chi_square(p, counts)
                out["unseen"] = float(counts[-1] / total) if p[-1] == 0.0 else 0.0
        self.counts = [0] * len(self.counts)
        self.missing = 0
        return out

    def judge(self, stats: dict[str, float], config: DriftConfig) -> dict[str, Any] | None:
        """Update the streak; return a reason when the feature starts to count as drifted."""
        value = stats.get(config.statistic)
        if value is None or value < config.threshold:
            self.streak = 0
            self.latched = False
            return None
        self.streak += 1
        if self.streak < config.consecutive or self.latched:
            return None
        self.latched = True
        return {"statistic": config.statistic, "value": value, "threshold": config.threshold}


def _columns(rows: Sequence[dict[str, Any]], names: Collection[str]) -> list[Sequence[Any]]:
    """The values of each of ``names`` in ``rows``, None where a row lacks it.

    When every row has every name (the usual case), the table is read in C
    (:func:`models.columns.transpose`) rather than by a ``dict.get`` per value in Python
    (the model stage's largest cost per prediction: 3.2 -> 2.8 us for 20 features).

    >>> _columns([{"a": 1, "b": 2}, {"a": 3, "b": 4}], ["a", "b"])
    [(1, 3), (2, 4)]
    >>> _columns([{"a": 1, "b": 2}, {"a": 3}], ["a", "b"])
    [[1, 3], [2, None]]
    """
    table = transpose(rows, names)
    return table if table is not None else [[row.get(name) for row in rows] for name in names]


class DataDriftMonitor:
    """Feature, prediction and label drift of one model version.

    Parameters
    ----------
    config
        Windows, statistic, thresholds.
    reference
        A published profile; without one the first ``config.reference_size``
        predictions become the reference.
    model, version
        Name the bootstrapped profile.

    Attributes
    ----------
    last
        Statistics of the last closed window: ``{"features": {name: {stat: value}},
        "prediction": {...}, "label": {...}}``.
    windows
        Windows closed so far.
    untracked
        Feature values ignored because the reference does not track their feature.
    """

    def __init__(self, config: DriftConfig, reference: ReferenceProfile | None = None,
                 model: str = "", version: str = "") -> None:
        self.config = config
        self.reference: ReferenceProfile | None = None
        self._next: ReferenceProfile | None = None
        self._builder: ProfileBuilder | None = None
        self.features: dict[str, FeatureWindow] = {}
        self.prediction: FeatureWindow | None = None
        self.label: FeatureWindow | None = None
        self.window_n = 0
        self.window_start: float | None = None
        self.windows = 0
        self.untracked = 0
        self.last: dict[str, Any] = {}
        if reference is not None:
            self._apply(reference)
        else:
            self._builder = ProfileBuilder(model, version, config.reference_size, config.task,
                                           config.bins, config.top_k, config.max_features)

    @property
    def source(self) -> str | None:
        """``"data"``, ``"bootstrap"``, or None while the bootstrap reference is building."""
        return self.reference.source if self.reference is not None else None

    @property
    def queued(self) -> ReferenceProfile | None:
        """A published profile that replaces the one in use from the next window."""
        return self._next

    def use(self, reference: ReferenceProfile) -> None:
        """Adopt a published profile: at once while bootstrapping, else from the next window."""
        if self.reference is None:
            self._apply(reference)
        else:
            self._next = reference

    def add_prediction(self, ts: float, features: dict[str, Any],
                       prediction: Any) -> list[dict[str, Any]]:
        """Absorb one prediction; return the drift reasons of a window it closes."""
        if self.reference is None:
            assert self._builder is not None
            built = self._builder.add(features, prediction)
            if built is not None:
                self._apply(built)
            return []
        present = 0
        for name, window in self.features.items():
            value = features.get(name)
            present += value is not None or name in features
            window.add(value)
        # Features the reference does not track (a capped or a new feature) are counted.
        self.untracked += len(features) - present
        if self.prediction is not None:
            self.prediction.add(prediction)
        self.window_n += 1
        if self.window_start is None:
            self.window_start = ts
        if (self.window_n >= self.config.window
                or ts - self.window_start >= self.config.window_seconds):
            return self._close()
        return []

    def add_predictions(self, ts: Sequence[float],
                        features: Sequence[dict[str, Any]] | FeatureColumns,
                        predictions: Sequence[Any]) -> list[tuple[int, list[dict[str, Any]]]]:
        """:meth:`add_prediction` of each prediction in order, binned a window's worth at a
        time; returns ``(i, reasons)`` for each window that prediction ``i`` closed with
        drift reasons. The counts, windows and reasons are those of one call per prediction.
        ``features`` is a dict per prediction, or a run's columns (:mod:`models.columns`).

        >>> from models.reference import FeatureProfile, ReferenceProfile
        >>> f = FeatureProfile("categorical", counts=(50, 50, 0), missing=0, categories=("a", "b"))
        >>> mon = DataDriftMonitor(DriftConfig(window=4, consecutive=1),
        ...                        reference=ReferenceProfile("m", "1", "data", 100, {"f": f}))
        >>> rows = [{"f": "a"}] * 6 + [{"f": "b"}] * 2  # windows: a a a a (drifts), a a b b
        >>> [(i, [r["feature"] for r in reasons]) for i, reasons in
        ...  mon.add_predictions([float(i) for i in range(8)], rows, [None] * 8)]
        [(3, ['f'])]
        >>> mon.windows, mon.features["f"].counts
        (2, [0, 0, 0])
        """
        closed: list[tuple[int, list[dict[str, Any]]]] = []
        i, n = 0, len(ts)
        while i < n:
            if self.reference is None:  # bootstrapping: the builder takes one at a time
                assert self._builder is not None
                stop = max(i + 1, min(n, i + self._builder.size - self._builder.n))
                rows = (features.rows(i, stop) if isinstance(features, FeatureColumns)
                        else features[i:stop])
                for k, row in enumerate(rows, i):
                    reasons = self.add_prediction(ts[k], row, predictions[k])
                    if reasons:
                        closed.append((k, reasons))
                i = stop
                continue
            last = self._window_end(ts, i)
            end = n if last is None else last + 1
            if isinstance(features, FeatureColumns):
                self._add_columns(features.slice(i, end))
            else:
                self._add_rows(features[i:end])
            if self.prediction is not None:
                self.prediction.add_many(predictions[i:end])
            self.window_n += end - i
            if self.window_start is None:
                self.window_start = ts[i]
            if last is not None:
                reasons = self._close()
                if reasons:
                    closed.append((last, reasons))
            i = end
        return closed

    def _window_end(self, ts: Sequence[float], i: int) -> int | None:
        """The first prediction from ``i`` on that closes the current window, or None."""
        start = ts[i] if self.window_start is None else self.window_start
        room = max(1, self.config.window - self.window_n)  # by count: prediction i + room - 1
        stop = min(len(ts), i + room)
        seconds = self.config.window_seconds
        if max(ts[i:stop]) - start >= seconds:  # by event time, sooner (the same test)
            for k in range(i, stop):
                if ts[k] - start >= seconds:
                    return k
        return stop - 1 if stop - i == room else None

    def _add_rows(self, chunk: Sequence[dict[str, Any]]) -> None:
        absent = 0
        for name, window, values in zip(self.features, self.features.values(),
                                        _columns(chunk, self.features), strict=True):
            types = set(map(type, values))
            if _NONE in types:  # None: a null value (present) or no value (absent)
                absent += sum(1 for f, v in zip(chunk, values, strict=True)
                              if v is None and name not in f)
            window.add_many(values, types)
        # Features the reference does not track (a capped or a new feature) are counted.
        self.untracked += sum(map(len, chunk)) - (len(chunk) * len(self.features) - absent)

    def _add_columns(self, chunk: FeatureColumns) -> None:
        n, absent = len(chunk), 0
        for name, window in self.features.items():
            column = chunk.columns.get(name)
            if column is None:  # no prediction of the run has it: missing in each
                window.missing += n
                absent += n
            else:
                window.add_column(column)
        self.untracked += n * len(chunk.columns) - (n * len(self.features) - absent)

    def add_label(self, label: Any) -> None:
        """Absorb the label of an outcome (judged when the prediction window closes)."""
        if self.label is not None:
            self.label.add(label)

    def _apply(self, reference: ReferenceProfile) -> None:
        self.reference = reference
        self._builder = None
        tracked = sorted(reference.features.items())[:self.config.max_features]
        self.features = {name: FeatureWindow(p) for name, p in tracked}
        self.prediction = FeatureWindow(reference.prediction) if reference.prediction else None
        self.label = FeatureWindow(reference.label) if reference.label else None
        self.window_n = 0
        self.window_start = None

    def _close(self) -> list[dict[str, Any]]:
        cfg = self.config
        reasons: list[dict[str, Any]] = []
        last: dict[str, Any] = {"features": {}}
        for name, window in self.features.items():
            stats = last["features"][name] = window.evaluate()
            reason = window.judge(stats, cfg)
            if reason is not None:
                reasons.append({"kind": "feature_drift", "feature": name, **reason})
        for kind, other in (("prediction", self.prediction), ("label", self.label)):
            if other is None:
                continue
            if kind == "label" and other.n < cfg.min_labels:
                # Too few labels this window: keep counting into the next, and keep the
                # last judged statistics (their gauges hold rather than vanish).
                if "label" in self.last:
                    last["label"] = self.last["label"]
                continue
            stats = last[kind] = other.evaluate()
            reason = other.judge(stats, cfg)
            if reason is not None:
                reasons.append({"kind": f"{kind}_drift", **reason})
        self.last = last
        self.windows += 1
        self.window_n = 0
        self.window_start = None
        if self._next is not None:
            self._apply(self._next)
            self._next = None
        # Strongest first, so a long list still leads with what matters.
        reasons.sort(key=lambda r: -r["value"] / r["threshold"])
        return reasons
