"""Everything driftwarden knows about one model: per-version monitors and absorbed offsets.

:class:`ModelState` is the value the worker keeps per model. It absorbs the records the
join produces (:class:`models.join.ModelRecord`, and runs of predictions as columns,
:class:`models.columns.PredictionRun`) idempotently: it remembers, per source partition,
the position of the last record it absorbed and skips anything at or below it, so a
record replayed after a crash is never counted twice.

Examples
--------
>>> from models.join import ModelRecord
>>> state = ModelState("m", PolicyBook())
>>> rec = ModelRecord("o", "m", "1", "l0", (5, 1), [10.0, "1", "1", 0.9, 0.9, 2.5])
>>> state.absorb(rec), state.absorb(rec)   # the second is a replay
(None, None)
>>> v = state.versions["1"]
>>> v.outcomes_seen, state.replays_skipped, v.delay_counts[1]
(1, 1, 1)
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from models.columns import FeatureColumns, OutcomeRun, PredictionRun
from models.datadrift import DataDriftMonitor
from models.estimate import ConfidenceEstimate
from models.events import class_key, regression_number
from models.join import ModelRecord
from models.performance import PerformanceMonitor
from models.policy import PolicyBook, PolicyConfig, RetrainingPolicy
from models.reference import ReferenceProfile

__all__ = ["DELAY_BUCKETS", "ModelState", "VersionMonitor"]

#: Fewer predictions than this are added one at a time: numpy's cost per call is more.
_BULK = 16
#: Upper bounds (seconds) of the label-delay histogram; +Inf is implied.
DELAY_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0, 604800.0)


class VersionMonitor:
    """Predictions, outcomes, metrics, detector and policy of one model version.

    Parameters
    ----------
    model, version
        What is monitored.
    config
        The model's PolicyConfig.
    """

    def __init__(self, model: str, version: str, config: PolicyConfig) -> None:
        self.model = model
        self.version = version
        self.predictions_seen = 0
        self.outcomes_seen = 0
        self.correct = 0
        self.detections: dict[str, int] = {}
        self.events_emitted = 0
        self.last_ts: float | None = None
        self.delay_counts = [0] * (len(DELAY_BUCKETS) + 1)
        self.delay_sum = 0.0
        self.performance = PerformanceMonitor(
            config.task, config.window, config.detector, config.detector_params
        )
        self.estimate = ConfidenceEstimate(config.window)
        self.policy = RetrainingPolicy(config, model, version)
        self.data = DataDriftMonitor(config.drift_config(), model=model, version=version)

    def reconfigure(self, config: PolicyConfig) -> None:
        """Decide under ``config`` from now on, keeping what this version was built with
        (:data:`models.policy.SHAPING_KEYS`: :meth:`PolicyConfig.running`)."""
        running = config.running(self.policy.config)
        self.policy.config = running
        self.data.config = running.drift_config()

    def rebuilt(self, config: PolicyConfig) -> VersionMonitor:
        """This version built anew under ``config``, with the published profile it uses:
        for one that has seen no prediction or outcome yet, as if first seen under it."""
        monitor = VersionMonitor(self.model, self.version, config)
        # Only published ones, before any prediction: the one in use, and one that
        # replaces it from the next window (with its baseline accuracy at once).
        for profile in (self.data.reference, self.data.queued):
            if profile is not None:
                monitor.use_reference(profile)
        return monitor

    def use_reference(self, profile: ReferenceProfile) -> None:
        """Adopt a published reference profile (from the next drift window on)."""
        self.data.use(profile)
        accuracy = profile.baseline.get("accuracy")
        if accuracy is not None:
            self.policy.reference = accuracy

    def add_prediction(self, ts: float, features: dict[str, Any], prediction: Any,
                       confidence: float | None) -> dict[str, Any] | None:
        """Absorb a prediction (labels may never come); return a RetrainingEvent or None."""
        self.predictions_seen += 1
        self._seen(ts)
        if confidence is not None:
            self.estimate.update(confidence)
        reasons = self.data.add_prediction(ts, features, prediction)
        if not reasons:
            return None
        event = self.policy.data_drift(
            ts=ts, reasons=reasons, outcomes_seen=self.outcomes_seen,
            predictions_seen=self.predictions_seen, accuracy=self._full_window_accuracy(),
            metrics=self._metrics)
        if event is not None:
            self.events_emitted += 1
        return event

    def add_predictions(self, items: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
        """:meth:`add_prediction` of each ``[ts, features, prediction, confidence]`` in
        order, the data drift binned in bulk; returns the RetrainingEvents fired."""
        if len(items) < _BULK:
            return [event for item in items if (event := self.add_prediction(*item))]
        return self._add_bulk([item[0] for item in items], [item[1] for item in items],
                              [item[2] for item in items], [item[3] for item in items])

    def add_run(self, run: PredictionRun, start: int = 0) -> list[dict[str, Any]]:
        """:meth:`add_predictions` of the run's predictions from ``start`` on, binned a
        column at a time; returns the RetrainingEvents fired."""
        return self._add_bulk(run.ts[start:], run.features.slice(start, len(run)),
                              run.predictions[start:], run.confidences[start:])

    def _add_bulk(self, ts: list[float], features: Sequence[dict[str, Any]] | FeatureColumns,
                  predictions: list[Any], confidences: list[float | None],
                  ) -> list[dict[str, Any]]:
        closed = self.data.add_predictions(ts, features, predictions)
        events: list[dict[str, Any]] = []
        done = 0
        for last, reasons in [*closed, (len(ts) - 1, None)]:
            # Up to the prediction that closed a window: what the policy sees when it fires.
            self.estimate.update_many(c for c in confidences[done:last + 1] if c is not None)
            self.predictions_seen += last + 1 - done
            if done <= last:
                self._seen(max(ts[done:last + 1]))
            done = last + 1
            if reasons:
                event = self.policy.data_drift(
                    ts=ts[last], reasons=reasons, outcomes_seen=self.outcomes_seen,
                    predictions_seen=self.predictions_seen,
                    accuracy=self._full_window_accuracy(), metrics=self._metrics)
                if event is not None:
                    self.events_emitted += 1
                    events.append(event)
        return events

    def _full_window_accuracy(self) -> float | None:
        """The rolling accuracy the policy judges: None until a full window of outcomes."""
        perf = self.performance
        return perf.rolling_accuracy if perf.n >= perf.window else None

    def _metrics(self) -> dict[str, float]:
        metrics = self.performance.report()
        if self.estimate.n:
            metrics["estimated_accuracy"] = self.estimate.rolling()
        return metrics

    def add_outcome(self, ts: float, prediction: Any, label: Any, p_label: float | None,
                    delay: float) -> dict[str, Any] | None:
        """Absorb an outcome; return a RetrainingEvent dict when the policy fires."""
        fired = self.add_outcomes([ts], [prediction], [label], [p_label], [delay])
        return fired[0] if fired else None

    def add_outcomes(self, ts: Sequence[float], predictions: Sequence[Any],
                     labels: Sequence[Any], p_labels: Sequence[float | None],
                     delays: Sequence[float]) -> list[dict[str, Any]]:
        """:meth:`add_outcome` of each outcome in order, one column per argument; returns
        the RetrainingEvents fired."""
        fired: list[dict[str, Any]] = []
        perf, policy, add_label = self.performance, self.policy, self.data.add_label
        counts, metrics, window = self.delay_counts, self._metrics, perf.window
        for t, prediction, label, p_label, delay in zip(
                ts, predictions, labels, p_labels, delays, strict=True):
            self.outcomes_seen += 1
            if self.last_ts is None or t > self.last_ts:
                self.last_ts = t
            self.correct += prediction == label
            self.delay_sum += delay
            counts[bisect.bisect_left(DELAY_BUCKETS, delay)] += 1
            add_label(label)
            perf.update(prediction, label, p_label)
            drift = perf.drift
            if drift is not None:
                name = drift.detector
                self.detections[name] = self.detections.get(name, 0) + 1
            event = policy.update(
                ts=t,
                outcomes_seen=self.outcomes_seen,
                predictions_seen=self.predictions_seen,
                drift=drift,
                accuracy=perf.rolling_accuracy if perf.n >= window else None,
                metrics=metrics,
            )
            if event is not None:
                self.events_emitted += 1
                fired.append(event)
        return fired

    def _seen(self, ts: float) -> None:
        if self.last_ts is None or ts > self.last_ts:
            self.last_ts = ts


class ModelState:
    """All versions of one model, plus the source positions already absorbed.

    Parameters
    ----------
    model
        The model name (the table key).
    policies
        Where each model's PolicyConfig comes from.
    """

    #: Policy changes not applied yet, as ``(records offset, config)`` in offset order
    #: (:meth:`reconfigure`). A class default: states stored before it have none.
    pending: tuple[tuple[int, PolicyConfig], ...] = ()

    def __init__(self, model: str, policies: PolicyBook) -> None:
        self.model = model
        self.config = policies.for_model(model)
        self.versions: dict[str, VersionMonitor] = {}
        self.positions: dict[str, tuple[int, int]] = {}
        self.replays_skipped = 0
        self.rejected = 0  # outcomes a regression model cannot score (non-numeric)
        self.references: dict[str, str] = {}  # version -> fingerprint of the profile in use

    def use_reference(self, profile: ReferenceProfile, fingerprint: str | None = None) -> bool:
        """Adopt a published profile for its version unless it is in use; True if adopted.

        ``fingerprint`` is ``profile.fingerprint()``, passed by callers that hold it so
        the profile is not encoded and hashed on every call.
        """
        fingerprint = fingerprint or profile.fingerprint()
        if self.references.get(profile.version) == fingerprint:
            return False
        self.references[profile.version] = fingerprint
        self.version(profile.version).use_reference(profile)
        return True

    def latest_config(self) -> PolicyConfig:
        """The policy the model is under once its pending changes apply."""
        return self.pending[-1][1] if self.pending else self.config

    def reconfigure(self, policies: PolicyBook, at: int | None = None) -> list[str]:
        """Adopt the model's policy as ``policies`` has it now, from the records message
        at offset ``at`` on (:meth:`reach`; None: at once); return the keys that changed
        (none: nothing changes).

        Versions already monitored then decide under it, keeping the
        :data:`models.policy.SHAPING_KEYS` they were built with; versions first seen
        afterwards are built under it whole. The change waits in the state, which is
        stored, until then: records absorbed before a crash whose state was not stored
        are absorbed again under the policy they had, and fire the same events with the
        same ids, whatever the file says since.

        >>> state = ModelState("m", PolicyBook())
        >>> state.absorb(ModelRecord("p", "m", "1", "p0", (0, 0), [1.0, {}, "a", None]))
        >>> book = PolicyBook(models={"m": PolicyConfig(accuracy_drop=0.3, window=50)})
        >>> state.reconfigure(book, at=7), state.reconfigure(book, at=9)
        (['window', 'accuracy_drop'], [])
        >>> state.reach(6); state.versions["1"].policy.config.accuracy_drop
        0.1
        >>> state.reach(7); v1, v2 = state.versions["1"], state.version("2")
        >>> v1.policy.config.accuracy_drop, v1.performance.window, v2.performance.window
        (0.3, 1000, 50)
        """
        config = policies.for_model(self.model)
        changed = self.latest_config().changed(config)
        if changed:
            self.pending = (*self.pending, (-1 if at is None else at, config))
            if at is None:  # with any change still pending before it
                self.reach(sys.maxsize)
        return changed

    def reach(self, offset: int) -> None:
        """Apply the policy changes due by the records message at ``offset``. A version a
        published profile made, which has seen no prediction or outcome yet, is built
        anew under the change, with its profile: its records come under it."""
        while self.pending and self.pending[0][0] <= offset:
            (_, config), self.pending = self.pending[0], self.pending[1:]
            self.config = config
            for name, monitor in self.versions.items():
                if (name in self.references and not monitor.predictions_seen
                        and not monitor.outcomes_seen):
                    self.versions[name] = monitor.rebuilt(config)
                else:
                    monitor.reconfigure(config)

    def version(self, version: str) -> VersionMonitor:
        monitor = self.versions.get(version)
        if monitor is None:
            monitor = self.versions[version] = VersionMonitor(self.model, version, self.config)
        return monitor

    def absorb(self, record: ModelRecord) -> dict[str, Any] | None:
        """Absorb one record unless already absorbed; return a RetrainingEvent or None."""
        fired = self.absorb_many((record,))
        return fired[0] if fired else None

    def absorb_many(self, records: Iterable[ModelRecord | PredictionRun | OutcomeRun],
                    ) -> list[dict[str, Any]]:
        """Absorb records in order, each unless already absorbed; return the
        RetrainingEvents fired. Consecutive predictions of a version go to
        :meth:`VersionMonitor.add_predictions` together, a run of them
        (:class:`models.columns.PredictionRun`) to :meth:`VersionMonitor.add_run`, a run of
        outcomes (:class:`models.columns.OutcomeRun`) to :meth:`VersionMonitor.add_outcomes`:
        the same result as one :meth:`absorb` each, with the drift histograms updated in
        bulk."""
        fired: list[dict[str, Any]] = []
        run: list[list[Any]] = []  # items of consecutive "p" records of run_version
        run_version = ""
        positions = self.positions
        for record in records:
            if not isinstance(record, ModelRecord):  # a run of predictions or outcomes
                if run:
                    fired += self.version(run_version).add_predictions(run)
                    run = []
                fired += (self._run(record) if isinstance(record, PredictionRun)
                          else self._outcomes(record))
                continue
            position = tuple(record.position)
            last = positions.get(record.source)
            if last is not None and position <= last:
                self.replays_skipped += 1
                continue
            positions[record.source] = position  # type: ignore[assignment]
            if record.kind == "p":
                if run and record.version != run_version:
                    fired += self.version(run_version).add_predictions(run)
                    run = []
                run.append(record.item)
                run_version = record.version
                continue
            if run:
                fired += self.version(run_version).add_predictions(run)
                run = []
            event = self._outcome(record)
            if event is not None:
                fired.append(event)
        if run:
            fired += self.version(run_version).add_predictions(run)
        return fired

    def _run(self, run: PredictionRun) -> list[dict[str, Any]]:
        # Its predictions are at (offset, 0), offsets increasing: those at or below the
        # last position absorbed from the source are a prefix.
        last = self.positions.get(run.source)
        start = 0
        if last is not None:
            offset, sub = last
            start = (bisect.bisect_right if sub >= 0 else bisect.bisect_left)(run.offsets, offset)
        self.replays_skipped += start
        if start == len(run):
            return []
        self.positions[run.source] = (run.offsets[-1], 0)
        return self.version(run.version).add_run(run, start)

    def _outcomes(self, run: OutcomeRun) -> list[dict[str, Any]]:
        # Its outcomes are at (batch, sub), subs increasing: those at or below the last
        # position absorbed from the source are a prefix.
        last = self.positions.get(run.source)
        start = 0
        if last is not None and run.batch <= last[0]:
            start = len(run) if run.batch < last[0] else bisect.bisect_right(run.subs, last[1])
        self.replays_skipped += start
        if start == len(run):
            return []
        self.positions[run.source] = (run.batch, run.subs[-1])
        return self._score(run.version, run.ts[start:], run.predictions[start:],
                           run.labels[start:], run.p_labels[start:], run.delays[start:])

    def _outcome(self, record: ModelRecord) -> dict[str, Any] | None:
        ts, prediction, label, p_label, _confidence, delay = record.item
        fired = self._score(record.version, [ts], [prediction], [label], [p_label], [delay])
        return fired[0] if fired else None

    def _score(self, version: str, ts: list[float], predictions: list[Any], labels: list[Any],
               p_labels: list[float | None], delays: list[float]) -> list[dict[str, Any]]:
        """:meth:`VersionMonitor.add_outcomes` of the outcomes the model can score: a
        classifier's as class keys; a regression model's only where prediction and label
        are both floats within ±1e153 (:func:`models.events.regression_number`). The join
        dead-letters the others; one from before a policy change
        is counted (``rejected``) and skipped rather than stopping the agent."""
        monitor = self.version(version)
        if monitor.policy.config.task != "regression":  # the version's own (SHAPING_KEYS)
            return monitor.add_outcomes(ts, list(map(class_key, predictions)),
                                        list(map(class_key, labels)), p_labels, delays)
        kept = [i for i, (p, label) in enumerate(zip(predictions, labels, strict=True))
                if regression_number(p) and regression_number(label)]
        if len(kept) < len(predictions):
            self.rejected += len(predictions) - len(kept)
            ts, delays = [ts[i] for i in kept], [delays[i] for i in kept]
            predictions, labels = [predictions[i] for i in kept], [labels[i] for i in kept]
            p_labels = [p_labels[i] for i in kept]
        return monitor.add_outcomes(ts, predictions, labels, p_labels, delays)
