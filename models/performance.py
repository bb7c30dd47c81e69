"""Online performance of one model version, from its outcomes (prediction joined with label).

Cumulative and rolling-window metrics come from river, and so does the concept-drift
detector that watches the error stream (1 for a wrong class, the absolute error for
regression). Only increases of the error are reported as drift: a model that gets better
needs no retraining.

Examples
--------
>>> import random
>>> rng = random.Random(7)
>>> monitor = PerformanceMonitor(window=500)
>>> fired_at = []
>>> for i in range(20_000):
...     error_rate = 0.1 if i < 10_000 else 0.3
...     label = rng.choice("ab")
...     wrong = rng.random() < error_rate
...     prediction = ("b" if label == "a" else "a") if wrong else label
...     _ = monitor.update(prediction, label)
...     if monitor.drift is not None:
...         fired_at.append(monitor.n)
>>> fired_at
[10080]
>>> round(monitor.accuracy, 4), round(monitor.rolling_accuracy, 4)
(0.797, 0.668)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from math import log
from typing import Any, cast

from river import drift, metrics, stats, utils

#: river's CrossEntropy clamps a probability to these before its logarithm.
_P_MIN, _P_MAX = 1e-15, 1 - 1e-15

__all__ = ["DETECTORS", "DriftSignal", "PerformanceMonitor", "RollingCount", "RollingMean",
           "recoverable", "try_detector"]


class _PageHinkley(drift.PageHinkley):
    """river's PageHinkley keeps its test as a bound method, which pickles only through
    ``builtins.getattr`` (refused by ``models.codec``); it is rebuilt from ``mode`` instead.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_test_drift", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._test_drift = {self._MODE_UP: self._test_increase,
                            self._MODE_DOWN: self._test_decrease}.get(self.mode, self._test_both)


def _one_sided(factory: Any, param: str, value: Any) -> Any:
    """Only error increases matter; a detector configured two-sided is refused."""

    def build(**kw: Any) -> Any:
        if kw.get(param, value) != value:
            raise ValueError(f"detector parameter {param!r} must be {value!r}: only error "
                             "increases are monitored")
        return factory(**{**kw, param: value})

    return build


#: Detector name -> (factory, works on binary errors only). All but ADWIN are one-sided:
#: they fire on error increases only. ADWIN is two-sided; its decreases are ignored.
DETECTORS: dict[str, tuple[Any, bool]] = {
    "ADWIN": (drift.ADWIN, False),
    "DDM": (drift.binary.DDM, True),
    "HDDM_A": (_one_sided(drift.binary.HDDMA, "two_sided_test", False), True),
    "HDDM_W": (_one_sided(drift.binary.HDDMW, "two_sided_test", False), True),
    "PageHinkley": (_one_sided(_PageHinkley, "mode", "up"), False),
}


class RollingCount:
    """How many of the last ``window`` outcomes were wrong: an exact rolling error rate.

    river's ``utils.Rolling`` calls the wrapped metric twice per outcome (``update``, and
    ``revert`` of the outcome leaving the window) and stores each outcome as an argument
    tuple; a classifier's rolling accuracy and error rate through it cost ~1.2 us per
    outcome and a ~30 KB pickle of the model state per 1,000-outcome window. Wrong or
    right is one bit: a ring of bytes and an integer count give the same accuracy (the
    same division of two whole numbers) and an error rate without rounding drift.

    >>> window = RollingCount(3)
    >>> for wrong in (1, 0, 0, 1, 1):
    ...     window.update(wrong)
    >>> window.n, window.ones, window.get()  # the last three: 0, 1, 1
    (3, 2, 0.6666666666666666)
    """

    __slots__ = ("_next", "_ring", "n", "ones", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.n = 0
        self.ones = 0
        self._ring = bytearray(window)
        self._next = 0

    def update(self, one: bool | int) -> None:
        """Absorb the next outcome: 1 (or True) if wrong."""
        i = self._next
        self.ones += one - self._ring[i]
        self._ring[i] = one
        self._next = i + 1 if i + 1 < self.window else 0
        if self.n < self.window:
            self.n += 1

    def get(self) -> float:
        """Share of ones in the window (0.0 when empty)."""
        return self.ones / self.n if self.n else 0.0


class RollingMean:
    """The mean of the last ``window`` values, exact: a regression's rolling absolute error.

    river's ``utils.Rolling`` keeps a running mean and subtracts each value again as it
    leaves the window, so the rounding of one outlier stays in the mean for good (an error
    of 1e20 among errors of 0.5 left a mean of 0.05 behind it). Here the running sum is
    kept exactly, as non-overlapping partial sums (Shewchuk's algorithm, which
    ``math.fsum`` uses; the standard library has no running form of it): adding a value
    and taking it away again leaves the sum as it was, to the bit. An update costs one
    pass over the partials, a few floats; a read sums them with ``math.fsum``.

    >>> window = RollingMean(3)
    >>> for error in (0.5, 1e20, 0.5, 0.5, 0.5):
    ...     window.update(error)
    >>> window.n, window.get()  # the last three
    (3, 0.5)
    """

    __slots__ = ("_next", "_partials", "_ring", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self._ring: list[float] = []
        self._next = 0
        self._partials: list[float] = []

    @property
    def n(self) -> int:
        """Values in the window."""
        return len(self._ring)

    def update(self, value: float) -> None:
        """Absorb the next value, dropping the oldest once the window is full."""
        ring = self._ring
        if len(ring) < self.window:
            ring.append(value)
        else:
            i = self._next
            _add_exact(self._partials, -ring[i])
            ring[i] = value
            self._next = i + 1 if i + 1 < self.window else 0
        _add_exact(self._partials, value)

    def get(self) -> float:
        """Mean of the window (0.0 when empty), correctly rounded."""
        return math.fsum(self._partials) / len(self._ring) if self._ring else 0.0


def _add_exact(partials: list[float], x: float) -> None:
    """Add ``x`` to the exact sum held as non-overlapping ``partials`` (Shewchuk)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


#: Outcomes :func:`try_detector` feeds a detector beyond its largest integer parameter
#: (its grace periods and warm-ups are such parameters), and the most in all.
TRIAL_OUTCOMES = 2_000
TRIAL_MAX = 100_000


def try_detector(task: str, detector: str, params: dict[str, Any]) -> None:
    """Build ``detector`` with ``params`` and run it as a version's monitor would, over a
    seeded error stream that steps up halfway; raise ValueError naming the parameter or
    saying what failed.

    river checks few parameters when a detector is built: a string threshold fails once
    the warm-up is over, ``drift_confidence=5.0`` at the first update (a logarithm of a
    negative number), and ADWIN's ``clock=0`` panics in its Rust core with an exception
    that is not an ``Exception``. Met in the worker, each would refuse every outcome of
    the model, or stop it; met here, the policy file is refused at start-up.

    >>> try_detector("classification", "DDM", {"warm_start": 50})
    >>> try_detector("classification", "PageHinkley", {"threshold": "x"})
    Traceback (most recent call last):
    ...
    ValueError: 'threshold' must be a number, like its default 50.0; got 'x'
    >>> try_detector("classification", "HDDM_A", {"drift_confidence": 5.0})
    Traceback (most recent call last):
    ...
    ValueError: 'drift_confidence' is a probability: it must be in (0, 1); got 5.0
    """
    factory, _ = DETECTORS[detector]
    built = factory(**params)
    defaults = inspect.signature(type(built)).parameters
    for name, value in params.items():
        default = defaults[name].default if name in defaults else None
        _check_like(name, value, default)
        if (detector, name) in _PROBABILITIES and not 0.0 < value < 1.0:
            # Accepted by river, and a detector that never fires (delta 0) or fails later.
            raise ValueError(f"{name!r} is a probability: it must be in (0, 1); got {value!r}")
    longest = max((v for v in params.values() if type(v) is int), default=0)
    n = min(TRIAL_OUTCOMES + max(longest, 0), TRIAL_MAX)
    monitor = PerformanceMonitor(task, window=100, detector=detector, detector_params=params)
    state = 12345
    try:
        for i in range(n):
            state = (state * 1103515245 + 12345) & 0x7FFFFFFF  # seeded, no random module
            wrong = state % 100 < (10 if i < n // 2 else 40)
            if task == "classification":
                monitor.update("1" if wrong else "0", "0")
            else:
                monitor.update(float(wrong) * (1 + state % 7), 0.0)
    except BaseException as exc:
        if not recoverable(exc):
            raise
        raise ValueError(f"running it failed: {exc} ({type(exc).__name__})") from None


def recoverable(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the monitoring code rather than an interrupt: any
    Exception, and the panics of river's Rust detectors (pyo3's PanicException is a
    BaseException, like KeyboardInterrupt and SystemExit, which are not)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


#: (detector, parameter) that are probabilities: confidence levels of the tests.
_PROBABILITIES = frozenset({
    ("ADWIN", "delta"), ("HDDM_A", "drift_confidence"), ("HDDM_A", "warning_confidence"),
    ("HDDM_W", "drift_confidence"), ("HDDM_W", "warning_confidence"),
})


def _check_like(name: str, value: Any, default: Any) -> None:
    """A parameter's value has its default's type (an int does for a float)."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = type(value) is int, "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        kind = "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise ValueError(f"{name!r} must be {kind}, like its default {default!r}; got {value!r}")


@dataclass(frozen=True, slots=True)
class DriftSignal:
    """A detected increase of the error: which detector, error rate before and after."""

    detector: str
    before: float
    after: float


class PerformanceMonitor:
    """Metrics and a concept-drift detector for one model version.

    Parameters
    ----------
    task
        ``"classification"`` (accuracy, macro precision/recall/F1, log loss from scores)
        or ``"regression"`` (MAE, RMSE).
    window
        Outcomes in the rolling window.
    detector
        One of :data:`DETECTORS`, run on the error stream.
    detector_params
        Keyword arguments for the detector's constructor.

    Attributes
    ----------
    n
        Outcomes absorbed.
    drift
        The :class:`DriftSignal` raised by the last update, or None.
    """

    def __init__(
        self,
        task: str = "classification",
        window: int = 1000,
        detector: str = "ADWIN",
        detector_params: dict[str, Any] | None = None,
    ) -> None:
        if task not in ("classification", "regression"):
            raise ValueError("task must be 'classification' or 'regression'")
        if window < 1:
            raise ValueError("window must be a positive integer")
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {sorted(DETECTORS)}")
        factory, binary_only = DETECTORS[detector]
        if binary_only and task == "regression":
            raise ValueError(f"detector {detector} needs binary errors; use ADWIN or PageHinkley")
        self.task = task
        self.window = window
        self.detector_name = detector
        self.detector = factory(**(detector_params or {}))
        self.n = 0
        self.drift: DriftSignal | None = None
        self._scored = 0
        self._since_drift = stats.Mean()
        # The classification metrics share one confusion matrix (river's ``cm``), updated
        # once per outcome instead of once per metric.
        self._cm: Any = None
        if task == "classification":
            cm = self._cm = metrics.ConfusionMatrix()
            self._metrics: dict[str, Any] = {
                "accuracy": metrics.Accuracy(cm=cm),
                "precision": metrics.MacroPrecision(cm=cm),
                "recall": metrics.MacroRecall(cm=cm),
                "f1": metrics.MacroF1(cm=cm),
            }
            # Wrong outcomes over the window: rolling accuracy and error rate both.
            self._errors: Any = RollingCount(window)
            self._rolling: Any = None
            self._log_loss = metrics.CrossEntropy()
        else:
            self._metrics = {"mae": metrics.MAE(), "rmse": metrics.RMSE()}
            # Absolute errors over the window: rolling MAE and error rate both.
            self._errors = RollingMean(window)
            self._rolling = None

    def update(
        self, prediction: Any, label: Any, p_label: float | None = None
    ) -> PerformanceMonitor:
        """Absorb one outcome.

        Parameters
        ----------
        prediction, label
            Class keys (classification) or numbers (regression).
        p_label
            Probability the model gave to the true class, when it published scores.
        """
        self.n += 1
        detector = self.detector
        before = self._before()
        if self.task == "classification":
            if self._cm is not None:
                self._cm.update(label, prediction)
            else:  # stored before the metrics shared a confusion matrix
                for metric in self._metrics.values():
                    metric.update(label, prediction)
            wrong = prediction != label
            self._errors.update(wrong)
            error = float(wrong)
            if p_label is not None:
                # CrossEntropy.update(label, {label: p_label}) without the dict: its
                # _eval of a one-class dict is this, to the bit (tested).
                self._log_loss._mean.update(-log(max(min(p_label, _P_MAX), _P_MIN)))
                self._scored += 1
        else:
            for metric in self._metrics.values():
                metric.update(label, prediction)
            error = abs(float(prediction) - float(label))
            self._errors.update(error)
        detector.update(error)
        self.drift = None
        if detector.drift_detected:
            after = self._after()
            # ADWIN flags any change of the mean, an improvement too; the others only
            # fire on increases, even when the lagging rolling window does not show it yet.
            if after > before or not isinstance(detector, drift.ADWIN):
                self.drift = DriftSignal(self.detector_name, before, after)
            self._since_drift = stats.Mean()
        self._since_drift.update(error)
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        # State stored before the metrics shared a confusion matrix: each has its own.
        state.setdefault("_cm", None)
        errors = state["_errors"]
        if state["task"] == "classification" and isinstance(errors, utils.Rolling):
            # Stored before RollingCount: river windows of errors and of (label, prediction).
            window = RollingCount(errors.window_size)
            for args, _ in errors.window:
                window.update(int(args[0]))
            state["_errors"], state["_rolling"] = window, None
        elif state["task"] == "regression" and isinstance(errors, utils.Rolling):
            # Stored before RollingMean: river windows of errors and of (label, prediction).
            mean = RollingMean(errors.window_size)
            for args, _ in errors.window:
                mean.update(float(args[0]))
            state["_errors"], state["_rolling"] = mean, None
        self.__dict__.update(state)

    def _before(self) -> float:
        if isinstance(self.detector, drift.ADWIN):
            # ADWIN's estimation, read from its helper without two property lookups (this
            # runs once per outcome)
            helper = self.detector._helper
            width = helper.get_width()
            return float(helper.get_total() / width) if width else 0.0
        return float(self._since_drift.get())

    def _after(self) -> float:
        if isinstance(self.detector, drift.ADWIN):
            return float(self.detector.estimation)
        return float(self._errors.get())

    @property
    def accuracy(self) -> float | None:
        """Cumulative accuracy (classification)."""
        return self._metrics["accuracy"].get() if self.task == "classification" and self.n else None

    @property
    def rolling_accuracy(self) -> float | None:
        """Accuracy over the last ``window`` outcomes (classification)."""
        if self.task != "classification" or not self.n:
            return None
        window = self._errors
        return (window.n - window.ones) / window.n

    @property
    def error_rate(self) -> float:
        """Mean error over the last ``window`` outcomes."""
        return float(self._errors.get())

    def report(self) -> dict[str, float]:
        """Every metric by name: cumulative, ``rolling_*`` and ``log_loss`` when known."""
        if not self.n:
            return {}
        out = {name: float(metric.get()) for name, metric in self._metrics.items()}
        if self.task == "classification":
            out["rolling_accuracy"] = cast(float, self.rolling_accuracy)
        else:
            out["rolling_mae"] = self._errors.get()
        out["rolling_error_rate"] = self.error_rate
        if self.task == "classification" and self._scored:
            out["log_loss"] = float(self._log_loss.get())
        return out
