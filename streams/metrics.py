"""Prometheus metrics (DESIGN.md section 6), declared in one place.

Counts come from durable state, not from process-local counters: after each batch the
agents publish a snapshot of the join partitions and models this worker owns, and the
collector renders it at scrape time. So a restarted worker reports the same totals, and a
partition moved to another worker stops being exported here (no stale series).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY, Counter, Info, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from models.errors import ConfigError
from models.join import split_count_key
from models.monitor import DELAY_BUCKETS, ModelState

__all__ = ["EVENTS_CONSUMED", "EVENTS_RECEIVED", "REPLAYS_SKIPPED", "Snapshot", "serve",
           "worker_info"]

EVENTS_CONSUMED = Counter(
    "driftwarden_events_consumed",
    "Input events this worker process has processed and stored (for model-records: "
    "messages).", ["topic"])
EVENTS_RECEIVED = Counter(
    "driftwarden_events_received",
    "Input events handed to this worker process's join, counted as its batch begins.",
    ["topic"])
REPLAYS_SKIPPED = Counter(
    "driftwarden_replays_skipped",
    "Events skipped because their offset was already absorbed (redelivery after a crash).",
    ["topic"],
)


@dataclass
class Snapshot:
    """What this worker owns, as of its last batch. Replaced wholesale per key."""

    join: dict[int, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # (logical topic, partition) -> events not yet processed; refreshed by a timer.
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    # Model-labelled series are exported for this many models at most (by name).
    max_models: int = 1000
    broker_up: bool = True
    # The stages this process runs (DRIFTWARDEN_ROLE): a stage's own series come from the
    # processes that run it only.
    runs_join: bool = True
    runs_models: bool = True
    # The model stage's reading of ``references``: the record keys whose latest profile
    # could not be read.
    invalid_references: set[bytes | None] = field(default_factory=set)
    # The dead letters the model stage wrote in this process, by (origin topic, reason):
    # unreadable reference profiles and records messages. (The join's are in its state.)
    stage_dead_letters: dict[tuple[str, str], int] = field(default_factory=dict)

    def set_join(self, partition: int, counts: dict[str, dict[str, int]], pending: int) -> None:
        self.join[partition] = {"counts": {k: dict(v) for k, v in counts.items()},
                                "pending": pending}

    def set_model(self, state: ModelState) -> None:
        rows = []
        for version, v in state.versions.items():
            report = v.performance.report()
            rows.append({
                "version": version,
                "outcomes": v.outcomes_seen,
                "predictions": v.predictions_seen,
                "report": report,
                "estimated": v.estimate.rolling() if v.estimate.n else None,
                # The policy in force: its accuracy_drop from the reference, or its floor.
                "threshold": (v.policy.threshold()
                              if v.performance.task == "classification" else None),
                # The configured detector counts from 0, so the first detection is a change.
                "detections": {v.performance.detector_name: 0, **v.detections},
                "events": v.events_emitted,
                "delay_counts": list(v.delay_counts),
                "delay_sum": v.delay_sum,
                "reference": v.data.source or "building",
                "drift": v.data.last,
                "drift_windows": v.data.windows,
                "untracked": v.data.untracked,
                "last_ts": v.last_ts,
            })
        self.models[state.model] = rows

    def forget(self, partitions: set[int], models: set[str]) -> None:
        for p in partitions:
            self.join.pop(p, None)
        for m in models:
            self.models.pop(m, None)
        self.lag.clear()


class _Collector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        join = list(self.snapshot.join.values())
        models = list(self.snapshot.models.items())
        # A flood of model names must not flood Prometheus: export the first max_models.
        names = {m for m, _ in models}
        for part in join:
            for counter in ("predictions", "expired"):
                names.update(split_count_key(k)[0] for k in part["counts"].get(counter, {}))
        allowed = set(sorted(names)[: self.snapshot.max_models])
        models = [(m, rows) for m, rows in models if m in allowed]
        yield from self._join(join, allowed)
        yield from self._models(models)
        yield from self._data_drift(models)
        yield from self._operations(models, len(names) - len(allowed))

    def _operations(self, models: list[tuple[str, list[dict[str, Any]]]],
                    dropped: int) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "driftwarden_consumer_lag",
            "Events in a partition not yet processed by this worker (high watermark minus "
            "the next offset to process).", labels=["topic", "partition"])
        for (topic, partition), n in sorted(self.snapshot.lag.items()):
            lag.add_metric([topic, str(partition)], n)
        yield lag
        last = GaugeMetricFamily(
            "driftwarden_last_event_timestamp_seconds",
            "Event time of the newest prediction or outcome of a model version.",
            labels=["model", "version"])
        for model, rows in sorted(models):
            for row in rows:
                if row["last_ts"] is not None:
                    last.add_metric([model, row["version"]], row["last_ts"])
        yield last
        broker = GaugeMetricFamily(
            "driftwarden_broker_up", "1 when a Kafka bootstrap server accepts connections.")
        broker.add_metric([], 1.0 if self.snapshot.broker_up else 0.0)
        yield broker
        capped = GaugeMetricFamily(
            "driftwarden_models_dropped",
            "Models whose series are not exported because of DRIFTWARDEN_MAX_MODELS.")
        capped.add_metric([], dropped)
        yield capped
        if self.snapshot.runs_models:
            invalid = GaugeMetricFamily(
                "driftwarden_invalid_references",
                "Profiles on the references topic, latest per key, that could not be read "
                "(dead-lettered as invalid_reference).")
            invalid.add_metric([], len(self.snapshot.invalid_references))
            yield invalid

    def _join(self, parts: list[dict[str, Any]], allowed: set[str]) -> Iterator[Metric]:
        def summed(counter: str) -> dict[tuple[str, ...], int]:
            out: dict[tuple[str, ...], int] = {}
            for part in parts:
                for label, n in part["counts"].get(counter, {}).items():
                    key = split_count_key(label)  # model|version, or topic|reason
                    if counter != "dead" and key[0] not in allowed:
                        continue
                    out[key] = out.get(key, 0) + n
            return out

        for name, counter, labels, help_ in (
            ("driftwarden_predictions", "predictions", ["model", "version"],
             "Valid predictions absorbed by the join."),
            ("driftwarden_expired_predictions", "expired", ["model", "version"],
             "Predictions whose label did not arrive within DRIFTWARDEN_LABEL_TTL_SECONDS."),
            ("driftwarden_dead_letters", "dead", ["topic", "reason"],
             "Events sent to the dead-letters topic, by origin topic and reason."),
        ):
            family = CounterMetricFamily(name, help_, labels=labels)
            counts = summed(counter)
            if counter == "dead":
                for stage_key, n in self.snapshot.stage_dead_letters.items():
                    counts[stage_key] = counts.get(stage_key, 0) + n
            for key, n in sorted(counts.items()):
                family.add_metric(list(key), n)
            yield family
        if self.snapshot.runs_join:
            pending = GaugeMetricFamily(
                "driftwarden_pending_labels",
                "Predictions waiting for their label on this worker.")
            pending.add_metric([], sum(p["pending"] for p in parts))
            yield pending

    def _models(self, models: list[tuple[str, list[dict[str, Any]]]]) -> Iterator[Metric]:
        mv = ["model", "version"]
        outcomes = CounterMetricFamily(
            "driftwarden_outcomes", "Predictions joined with their label.", labels=mv)
        accuracy = GaugeMetricFamily(
            "driftwarden_accuracy", "Realised accuracy (0-1), cumulative and rolling window.",
            labels=[*mv, "window"])
        estimated = GaugeMetricFamily(
            "driftwarden_estimated_accuracy",
            "Label-free accuracy estimate: mean top-class probability over the rolling window.",
            labels=mv)
        threshold = GaugeMetricFamily(
            "driftwarden_accuracy_threshold",
            "Rolling accuracy below which the version counts as degraded (its policy).",
            labels=mv)
        gauges = {
            name: GaugeMetricFamily(f"driftwarden_{name}", help_, labels=mv)
            for name, help_ in (
                ("precision", "Macro-averaged precision (0-1), cumulative."),
                ("recall", "Macro-averaged recall (0-1), cumulative."),
                ("f1", "Macro-averaged F1 score (0-1), cumulative."),
                ("log_loss", "Log loss of the published scores, cumulative."),
                ("mae", "Mean absolute error (regression), cumulative."),
                ("rmse", "Root mean squared error (regression), cumulative."),
            )
        }
        error_rate = GaugeMetricFamily(
            "driftwarden_error_rate", "Mean error over the rolling window.", labels=[*mv, "window"])
        drift = CounterMetricFamily(
            "driftwarden_drift_detected", "Error increases flagged by the concept-drift detector.",
            labels=[*mv, "detector"])
        events = CounterMetricFamily(
            "driftwarden_retraining_events", "Retraining events published.", labels=mv)
        delay = HistogramMetricFamily(
            "driftwarden_label_delay_seconds", "Time from prediction to its label.",
            labels=["model"])
        for model, rows in sorted(models):
            counts = [0] * (len(DELAY_BUCKETS) + 1)
            delay_sum = 0.0
            for row in rows:
                labels = [model, row["version"]]
                report = row["report"]
                outcomes.add_metric(labels, row["outcomes"])
                if "accuracy" in report:
                    accuracy.add_metric([*labels, "cumulative"], report["accuracy"])
                    accuracy.add_metric([*labels, "rolling"], report["rolling_accuracy"])
                if "rolling_error_rate" in report:
                    error_rate.add_metric([*labels, "rolling"], report["rolling_error_rate"])
                if row["estimated"] is not None:
                    estimated.add_metric(labels, row["estimated"])
                if row["threshold"] is not None:
                    threshold.add_metric(labels, row["threshold"])
                for name, family in gauges.items():
                    if name in report:
                        family.add_metric(labels, report[name])
                for detector, n in row["detections"].items():
                    drift.add_metric([*labels, detector], n)
                events.add_metric(labels, row["events"])
                counts = [a + b for a, b in zip(counts, row["delay_counts"], strict=True)]
                delay_sum += row["delay_sum"]
            cumulative, buckets = 0, []
            for bound, n in zip([*DELAY_BUCKETS, float("inf")], counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            delay.add_metric([model], buckets, delay_sum)
        yield outcomes
        yield accuracy
        yield threshold
        yield estimated
        yield from gauges.values()
        yield error_rate
        yield drift
        yield events
        yield delay


    def _data_drift(self, models: list[tuple[str, list[dict[str, Any]]]]) -> Iterator[Metric]:
        mv = ["model", "version"]
        feature = GaugeMetricFamily(
            "driftwarden_feature_drift",
            "Drift of a feature in the last closed window vs the reference (psi, js, ks, chi2, "
            "unseen, missing).", labels=[*mv, "feature", "statistic"])
        others = {
            kind: GaugeMetricFamily(
                f"driftwarden_{kind}_drift",
                f"Drift of the {kind} distribution in the last closed window vs the reference.",
                labels=[*mv, "statistic"])
            for kind in ("prediction", "label")
        }
        reference = GaugeMetricFamily(
            "driftwarden_reference_info",
            "1 for the reference in use: source is data (published), bootstrap (first "
            "predictions) or building (bootstrap still collecting).", labels=[*mv, "source"])
        windows = CounterMetricFamily(
            "driftwarden_drift_windows", "Data-drift windows evaluated.", labels=mv)
        untracked = CounterMetricFamily(
            "driftwarden_untracked_feature_values",
            "Feature values not monitored: their feature is not in the reference (new, or "
            "beyond drift_max_features).", labels=mv)
        for model, rows in sorted(models):
            for row in rows:
                labels = [model, row["version"]]
                reference.add_metric([*labels, row["reference"]], 1.0)
                windows.add_metric(labels, row["drift_windows"])
                untracked.add_metric(labels, row["untracked"])
                last = row["drift"]
                for name, stats in sorted(last.get("features", {}).items()):
                    for statistic, value in sorted(stats.items()):
                        feature.add_metric([*labels, name, statistic], value)
                for kind, family in others.items():
                    for statistic, value in sorted(last.get(kind, {}).items()):
                        family.add_metric([*labels, statistic], value)
        yield feature
        yield from others.values()
        yield reference
        yield windows
        yield untracked


def worker_info(info: dict[str, str]) -> None:
    """Export ``driftwarden_worker_info``: this process's versions and configuration."""
    Info("driftwarden_worker", "This worker process: versions and configuration.").info(info)


def serve(snapshot: Snapshot, host: str, port: int) -> None:
    """Register the collector and start the HTTP endpoint (a daemon thread)."""
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on DRIFTWARDEN_METRICS_HOST:DRIFTWARDEN_METRICS_PORT="
            f"{host}:{port}: {exc.strerror}"
        ) from None
    REGISTRY.register(_Collector(snapshot))
