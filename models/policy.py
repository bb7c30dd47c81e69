"""Retraining policy: turns monitoring signals into RetrainingEvents (DESIGN.md section 3).

A signal becomes an event only with enough evidence (``min_outcomes``), outside the
cooldown of the model version's previous event, and once per episode: a threshold reason
latches when it fires and re-arms only after the metric recovers by ``hysteresis``.
Signals that arrive during the cooldown are suppressed (and latched), so one degradation
gives one event. Event ids are ``model:version:seq`` with a per-version sequence, so a
replay after a crash republishes the same id.

Examples
--------
>>> policy = RetrainingPolicy(PolicyConfig(min_outcomes=10, cooldown_seconds=60), "m", "1")
>>> kw = dict(outcomes_seen=100, predictions_seen=120, drift=None, metrics=dict)
>>> policy.update(ts=10.0, accuracy=0.90, **kw) is None   # first full window: reference
True
>>> event = policy.update(ts=20.0, accuracy=0.70, **kw)
>>> event["id"], event["severity"], event["reasons"][0]["kind"], event["reasons"][0]["after"]
('m:1:000001', 'critical', 'performance', 0.7)
>>> policy.update(ts=200.0, accuracy=0.70, **kw) is None  # latched: same episode
True
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from models.datadrift import DriftConfig
from models.errors import ConfigError
from models.performance import DETECTORS, DriftSignal, try_detector

__all__ = ["SHAPING_KEYS", "PolicyBook", "PolicyConfig", "RetrainingPolicy", "event_id"]

#: Most outcomes in the rolling window (kept per model version, in memory).
MAX_WINDOW = 1_000_000

#: The policy keys that shape what a model version builds when it is first seen: its
#: task, rolling window and detector, and its bootstrapped reference. A version keeps
#: them for its life; the other keys are read at each decision, so a changed value
#: reaches versions already monitored (:meth:`PolicyConfig.running`).
SHAPING_KEYS = ("task", "window", "detector", "detector_params", "reference_size",
                "drift_bins", "drift_top_k", "drift_max_features")


@dataclass(frozen=True)
class PolicyConfig:
    """Monitoring and retraining settings of one model (all versions).

    Parameters
    ----------
    task
        ``"classification"`` or ``"regression"``.
    window
        Outcomes in the rolling window; its first full value is the reference accuracy
        unless a reference profile gives a baseline.
    detector, detector_params
        Concept-drift detector on the error stream (see ``models.performance.DETECTORS``).
    min_outcomes
        Outcomes a version must have before any event.
    cooldown_seconds
        Event time between two events of the same version.
    accuracy_min
        Absolute floor for the rolling accuracy (None: no floor).
    accuracy_drop
        Relative drop from the reference accuracy that counts as degraded.
    critical_drop
        Relative drop (or two reasons at once) that makes an event ``critical``.
    hysteresis
        How far above the threshold accuracy must recover before it can fire again.
    """

    task: str = "classification"
    window: int = 1000
    detector: str = "ADWIN"
    detector_params: dict[str, Any] = field(default_factory=dict)
    min_outcomes: int = 1000
    cooldown_seconds: float = 3600.0
    accuracy_min: float | None = None
    accuracy_drop: float = 0.10
    critical_drop: float = 0.20
    hysteresis: float = 0.02
    # Data drift: the fields of models.datadrift.DriftConfig, with its defaults.
    reference_size: int = DriftConfig.reference_size
    drift_window: int = DriftConfig.window
    drift_window_seconds: float = DriftConfig.window_seconds
    drift_statistic: str = DriftConfig.statistic
    drift_threshold: float = DriftConfig.threshold
    drift_consecutive: int = DriftConfig.consecutive
    drift_bins: int = DriftConfig.bins
    drift_top_k: int = DriftConfig.top_k
    drift_max_features: int = DriftConfig.max_features
    drift_min_labels: int = DriftConfig.min_labels

    def changed(self, other: PolicyConfig) -> list[str]:
        """The keys whose values differ in ``other``, in declaration order.

        >>> PolicyConfig().changed(PolicyConfig(window=50, accuracy_drop=0.2))
        ['window', 'accuracy_drop']
        """
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def running(self, built: PolicyConfig) -> PolicyConfig:
        """This config as a version first built under ``built`` runs under it: ``built``'s
        :data:`SHAPING_KEYS`, this config's other keys.

        >>> now = PolicyConfig(window=50, accuracy_drop=0.2).running(PolicyConfig())
        >>> now.window, now.accuracy_drop
        (1000, 0.2)
        """
        return replace(self, **{key: getattr(built, key) for key in SHAPING_KEYS})

    def drift_config(self) -> DriftConfig:
        """The data-drift settings, as :class:`models.datadrift.DriftConfig`."""
        return DriftConfig(task=self.task,
                           **{name: getattr(self, key) for name, key in _DRIFT_KEYS.items()})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = _TYPES[f.name]
            if value is None and f.name == "accuracy_min":
                continue
            # bool is an int to Python, never a count or a rate here.
            if isinstance(value, bool) or not isinstance(value, want):
                kind = "a number" if want is _NUMBER else f"of type {want.__name__}"
                raise ConfigError(f"policy {f.name!r} must be {kind}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"policy {f.name!r} must be finite, got {value!r}")
        if self.task not in ("classification", "regression"):
            raise ConfigError("policy 'task' must be 'classification' or 'regression', "
                              f"got {self.task!r}")
        if self.detector not in DETECTORS:
            raise ConfigError(f"policy 'detector' must be one of {sorted(DETECTORS)}, "
                              f"got {self.detector!r}")
        for name in ("window", "min_outcomes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"policy '{name}' must be a positive integer, "
                                  f"got {getattr(self, name)!r}")
        if self.window > MAX_WINDOW:  # a byte per outcome of it, per model version
            raise ConfigError(f"policy 'window' must be at most {MAX_WINDOW:,}, "
                              f"got {self.window!r}")
        try:
            self.drift_config()
        except ValueError as exc:  # DriftConfig names its field first: name the policy key
            name, _, rest = str(exc).partition(" ")
            raise ConfigError(f"policy '{_DRIFT_KEYS[name]}' {rest}") from None
        if self.cooldown_seconds < 0:
            raise ConfigError(f"policy 'cooldown_seconds' must be >= 0, "
                              f"got {self.cooldown_seconds!r}")
        for name in ("accuracy_drop", "critical_drop", "hysteresis"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"policy '{name}' must be in [0, 1), got {getattr(self, name)!r}")
        if self.accuracy_min is not None and not 0.0 <= self.accuracy_min <= 1.0:
            raise ConfigError(f"policy 'accuracy_min' must be in [0, 1], got {self.accuracy_min!r}")
        factory, binary_only = DETECTORS[self.detector]
        if binary_only and self.task == "regression":
            raise ConfigError(f"policy 'detector' {self.detector} needs binary errors; "
                              "a regression model can use ADWIN or PageHinkley")
        try:  # a typo in detector_params fails at start-up, not inside the worker
            factory(**self.detector_params)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"policy 'detector_params' do not suit {self.detector}: {exc}"
                              ) from None

    def check_detector(self) -> None:
        """Raise ConfigError unless the detector runs with ``detector_params``
        (:func:`models.performance.try_detector`). Asked of a policy file as it is read,
        not of every config made: a version keeps the parameters it was built with,
        which an earlier release may have taken, through later changes of the file
        (:meth:`running`)."""
        if self.detector_params:
            why = _detector_trial(self.task, self.detector, self.detector_params)
            if why:
                raise ConfigError(f"policy 'detector_params' do not suit {self.detector}: {why}")


def _detector_trial(task: str, detector: str, params: dict[str, Any]) -> str:
    """Why the detector does not run with ``params``, or "" (remembered: each model's
    policy is checked, and most share the default's parameters)."""
    key = (task, detector, repr(sorted(params.items())))
    why = _TRIED.get(key)
    if why is None:
        try:
            try_detector(task, detector, params)
            why = ""
        except (TypeError, ValueError, OverflowError) as exc:
            why = str(exc)
        if len(_TRIED) < 256:
            _TRIED[key] = why
    return why


_TRIED: dict[tuple[str, str, str], str] = {}


#: DriftConfig field -> policy key.
_DRIFT_KEYS = {
    "reference_size": "reference_size", "window": "drift_window",
    "window_seconds": "drift_window_seconds", "statistic": "drift_statistic",
    "threshold": "drift_threshold", "consecutive": "drift_consecutive", "bins": "drift_bins",
    "top_k": "drift_top_k", "max_features": "drift_max_features",
    "min_labels": "drift_min_labels",
}
_NUMBER = (int, float)
_TYPES: dict[str, Any] = {
    "task": str, "window": int, "detector": str, "detector_params": dict,
    "min_outcomes": int, "cooldown_seconds": _NUMBER, "accuracy_min": _NUMBER,
    "accuracy_drop": _NUMBER, "critical_drop": _NUMBER, "hysteresis": _NUMBER,
    "reference_size": int, "drift_window": int, "drift_window_seconds": _NUMBER,
    "drift_statistic": str, "drift_threshold": _NUMBER, "drift_consecutive": int,
    "drift_bins": int, "drift_top_k": int, "drift_max_features": int, "drift_min_labels": int,
}


def event_id(model: str, version: str, seq: int) -> str:
    """A RetrainingEvent's id: ``model:version:seq`` (seq in six digits or more), with a
    ``%`` or ``:`` in the model or version written ``%25`` or ``%3A``, so that the ids of
    two model versions never meet (``a:b`` version ``c``, ``a`` version ``b:c``).

    >>> event_id("fraud", "3", 7)
    'fraud:3:000007'
    >>> event_id("a:b", "c", 1), event_id("a", "b:c", 1), event_id("100%", "1", 1)
    ('a%3Ab:c:000001', 'a:b%3Ac:000001', '100%25:1:000001')
    """
    return f"{_id_part(model)}:{_id_part(version)}:{seq:06d}"


def _id_part(name: str) -> str:
    if "%" not in name and ":" not in name:
        return name
    return name.replace("%", "%25").replace(":", "%3A")


#: Margin of the accuracy comparisons. The threshold is a product of floats, rounded
#: either way (0.53 * 0.9 is 0.47700000000000004), so an accuracy exactly at it could
#: count as below; accuracies over a window of at most MAX_WINDOW outcomes differ by at
#: least 1e-6, so a margin of 1e-9 never moves one from below to above. The same for the
#: relative drop against ``critical_drop`` ((0.5 - 0.4) / 0.5 is 0.19999999999999996).
_MARGIN = 1e-9


class PolicyBook:
    """Per-model PolicyConfigs from a TOML document, with a default.

    >>> book = PolicyBook.from_toml('[default]\\ndetector = "DDM"\\n[models.fraud]\\nwindow = 500')
    >>> book.for_model("fraud").window, book.for_model("fraud").detector, book.for_model("x").window
    (500, 'DDM', 1000)
    """

    def __init__(self, default: PolicyConfig | None = None,
                 models: dict[str, PolicyConfig] | None = None) -> None:
        self.default = default or PolicyConfig()
        self.models = models or {}

    @classmethod
    def from_toml(cls, text: str, source: str = "policy file") -> PolicyBook:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source} is not valid TOML: {exc}") from None
        known = {f.name for f in fields(PolicyConfig)}
        extra = set(doc) - {"default", "models"}
        if extra:
            raise ConfigError(f"{source}: unknown section(s) {sorted(extra)}; "
                              "use [default] and [models.NAME]")

        def build(section: Any, where: str, base: dict[str, Any]) -> PolicyConfig:
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: [{where}] must be a table of settings")
            unknown = set(section) - known
            if unknown:
                raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)} in [{where}]")
            try:
                config = PolicyConfig(**{**base, **section})
                config.check_detector()
                return config
            except (ConfigError, TypeError) as exc:
                raise ConfigError(f"{source} [{where}]: {exc}") from None

        default_section = doc.get("default", {})
        default = build(default_section, "default", {})
        models_section = doc.get("models", {})
        if not isinstance(models_section, dict):
            raise ConfigError(f"{source}: [models] must hold one [models.NAME] table per model")
        models = {name: build(section, f"models.{name}", default_section)
                  for name, section in models_section.items()}
        return cls(default, models)

    def for_model(self, model: str) -> PolicyConfig:
        return self.models.get(model, self.default)


class RetrainingPolicy:
    """Decides when one model version needs retraining.

    Parameters
    ----------
    config
        The model's PolicyConfig.
    model, version
        Identify the version in event ids.

    Attributes
    ----------
    seq
        Events emitted so far (the last id's sequence number).
    suppressed
        Signals dropped by the cooldown.
    reference
        Reference accuracy (baseline from a profile, else the first full window).
    """

    def __init__(self, config: PolicyConfig, model: str, version: str) -> None:
        self.config = config
        self.model = model
        self.version = version
        self.seq = 0
        self.suppressed = 0
        self.reference: float | None = None
        self.last_fired: float | None = None
        self.window_start: float | None = None
        self._latched: set[str] = set()

    def threshold(self) -> float | None:
        """Accuracy below which the version counts as degraded."""
        floor = self.config.accuracy_min
        if self.reference is None:
            return floor
        drop = self.reference * (1.0 - self.config.accuracy_drop)
        return drop if floor is None or drop > floor else floor

    def update(
        self,
        *,
        ts: float,
        outcomes_seen: int,
        predictions_seen: int,
        drift: DriftSignal | None,
        accuracy: float | None,
        metrics: Callable[[], dict[str, float]],
        extra_reasons: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any] | None:
        """Take the signals after one outcome; return a RetrainingEvent dict or None.

        ``accuracy`` is the rolling accuracy, ``None`` until the window is full;
        ``metrics`` returns the metrics an event carries, and is called only when one
        fires (building them on every outcome cost more than the detectors).
        """
        if self.window_start is None:
            self.window_start = ts
        cfg = self.config
        if accuracy is not None and self.reference is None:
            self.reference = accuracy
        if outcomes_seen < cfg.min_outcomes:
            return None
        reasons: list[dict[str, Any]] = []
        if drift is not None:
            reasons.append({"kind": "concept_drift", "detector": drift.detector,
                            "metric": "error_rate", "before": drift.before, "after": drift.after})
        threshold = self.threshold()
        if accuracy is not None and threshold is not None:
            if accuracy < threshold - _MARGIN and "performance" not in self._latched:
                self._latched.add("performance")
                reasons.append({"kind": "performance", "metric": "accuracy",
                                "before": self.reference, "after": accuracy,
                                "threshold": threshold})
            elif accuracy >= threshold + cfg.hysteresis - _MARGIN:
                self._latched.discard("performance")
        reasons.extend(extra_reasons or [])
        if not reasons:
            return None
        if self._cooling(ts):
            return None
        return self._fire(ts, reasons, outcomes_seen, predictions_seen, accuracy, metrics)

    def data_drift(self, *, ts: float, reasons: list[dict[str, Any]], outcomes_seen: int,
                   predictions_seen: int, accuracy: float | None,
                   metrics: Callable[[], dict[str, float]]) -> dict[str, Any] | None:
        """Take the drift reasons of a closed window; return a RetrainingEvent dict or None.

        Data drift needs no outcomes (labels may never come): the evidence is the reference
        and ``drift_consecutive`` windows. The cooldown is shared with performance events.
        ``accuracy`` is the rolling accuracy as :meth:`update` takes it: None until a full
        window of outcomes, so a handful of labels neither shows as the event's accuracy
        nor makes it critical.
        """
        if self.window_start is None:
            self.window_start = ts
        if not reasons:
            return None
        if self._cooling(ts):
            return None
        return self._fire(ts, reasons, outcomes_seen, predictions_seen, accuracy, metrics)

    def _cooling(self, ts: float) -> bool:
        """Within the cooldown of the last event: the signal is suppressed (and counted)."""
        if self.last_fired is not None and ts - self.last_fired < self.config.cooldown_seconds:
            self.suppressed += 1
            return True
        return False

    def _fire(self, ts: float, reasons: list[dict[str, Any]], outcomes_seen: int,
              predictions_seen: int, accuracy: float | None,
              metrics: Callable[[], dict[str, float]]) -> dict[str, Any]:
        self.seq += 1
        drop = 0.0
        if accuracy is not None and self.reference:
            drop = (self.reference - accuracy) / self.reference
        critical = len(reasons) > 1 or drop >= self.config.critical_drop - _MARGIN
        event = {
            "id": event_id(self.model, self.version, self.seq),
            "model": self.model,
            "version": self.version,
            "ts": ts,
            "severity": "critical" if critical else "warning",
            "reasons": reasons,
            "evidence": {
                "predictions_seen": predictions_seen,
                "outcomes_seen": outcomes_seen,
                "window": {"start": self.window_start, "end": ts},
            },
            "metrics": {**metrics(), "accuracy": accuracy, "accuracy_reference": self.reference},
        }
        self.last_fired = ts
        self.window_start = ts
        return event
