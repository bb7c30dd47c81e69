"""A seeded stream of prediction and label events with a known change, for demos and tests.

Features and the true class come from river's SEA generator. The "model" publishes
calibrated scores: it is right with probability equal to its confidence until outcome
``change_at``, after which it keeps its confidence but is wrong ``error_after - error_before``
more often (concept drift a label-free estimate cannot see). Labels arrive after a uniform
delay; a fraction never arrives. Events come out in event-time order, so a label may reach
Kafka before its prediction has been consumed.

Examples
--------
>>> events = list(simulate(Scenario(n=5, seed=1, unlabelled=0.0)))
>>> [(e.topic, e.key) for e in events[:3]]
[('predictions', 'sim-1-0'), ('predictions', 'sim-1-1'), ('predictions', 'sim-1-2')]
>>> sorted(events[0].value)
['features', 'id', 'model', 'prediction', 'scores', 'ts', 'version']
>>> sum(e.topic == "labels" for e in events)
5
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from river.datasets import synth

__all__ = [
    "CATEGORIES", "CATEGORY_P", "Scenario", "SimEvent", "WideScenario", "simulate",
    "simulate_wide",
]


@dataclass(frozen=True)
class Scenario:
    """What to simulate.

    Parameters
    ----------
    n
        Predictions.
    model, version
        Who publishes them.
    seed
        Seed of every random draw.
    error_before, error_after
        Error rates before and after the change (each at most 0.5).
    change_at
        Outcome (labelled prediction, in generation order) at which the error changes;
        None for a stationary stream.
    rate
        Predictions per second of event time.
    label_delay
        (low, high) seconds of the uniform label delay.
    unlabelled
        Fraction of predictions whose label never comes.
    start_ts
        Event time of the first prediction.
    """

    n: int = 100_000
    model: str = "demo"
    version: str = "1"
    seed: int = 42
    error_before: float = 0.1
    error_after: float = 0.3
    change_at: int | None = None
    rate: float = 10.0
    label_delay: tuple[float, float] = (0.0, 30.0)
    unlabelled: float = 0.1
    start_ts: float = 1_763_800_000.0

    def __post_init__(self) -> None:
        if not 0 <= self.error_before <= 0.5 or not 0 <= self.error_after <= 1:
            raise ValueError("error_before must be in [0, 0.5] and error_after in [0, 1], got "
                             f"{self.error_before:g} and {self.error_after:g}")
        if not 0 <= self.unlabelled < 1:
            raise ValueError(f"unlabelled must be in [0, 1), got {self.unlabelled:g}")
        if self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        low, high = self.label_delay
        if not 0 <= low <= high:
            raise ValueError(f"label_delay must be 0 <= low <= high, got {low:g} and {high:g}")


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One event to produce: logical topic, key, JSON value, event time."""

    topic: str
    key: str
    value: dict[str, Any]
    ts: float
    correct: bool | None = None  # for labels: whether the prediction was right


def simulate(s: Scenario) -> Iterator[SimEvent]:
    """Yield the scenario's events in event-time order."""
    rng = random.Random(s.seed)
    sea = synth.SEA(variant=0, seed=s.seed)
    channels = ("web", "app", "store")
    pending: list[tuple[float, int, SimEvent]] = []
    outcomes = 0
    for i, (x, y) in enumerate(sea.take(s.n)):
        ts = s.start_ts + i / s.rate
        while pending and pending[0][0] <= ts:
            yield heapq.heappop(pending)[2]
        truth = int(y)
        # Calibrated confidence with mean 1 - e, never below 1/2 (the prediction must be
        # the top class): uniform on [1 - 2e, 1] up to e = 1/4, on [1/2, 3/2 - 2e] above.
        e = s.error_before
        confidence = rng.uniform(1.0 - 2.0 * e, 1.0) if e <= 0.25 else rng.uniform(0.5, 1.5 - 2 * e)
        labelled = rng.random() >= s.unlabelled
        drifted = s.change_at is not None and labelled and outcomes >= s.change_at
        p_right = confidence - (s.error_after - s.error_before if drifted else 0.0)
        correct = rng.random() < p_right
        prediction = truth if correct else 1 - truth
        event_id = f"sim-{s.seed}-{i}"
        yield SimEvent("predictions", event_id, {
            "id": event_id,
            "model": s.model,
            "version": s.version,
            "ts": round(ts, 3),
            "features": {"x1": x[0], "x2": x[1], "x3": x[2], "channel": rng.choice(channels)},
            "prediction": prediction,
            "scores": {str(prediction): confidence, str(1 - prediction): 1.0 - confidence},
        }, ts)
        if labelled:
            outcomes += 1
            label_ts = ts + rng.uniform(*s.label_delay)
            label = SimEvent("labels", event_id,
                             {"id": event_id, "label": truth, "ts": round(label_ts, 3)},
                             label_ts, correct)
            heapq.heappush(pending, (label_ts, i, label))
    while pending:
        yield heapq.heappop(pending)[2]


#: Categories of every simulated categorical feature and their frequencies.
CATEGORIES = ("a", "b", "c", "d", "e")
CATEGORY_P = (0.40, 0.25, 0.15, 0.12, 0.08)


@dataclass(frozen=True)
class WideScenario:
    """Unlabelled predictions with many features and an optional shift in one of them.

    Numeric features ``n0 .. n{numeric-1}`` are normal with mean ``j`` and standard
    deviation ``1 + j / 4``; categorical ``c0 ..`` take :data:`CATEGORIES` with
    :data:`CATEGORY_P`. The prediction (classes 0/1, 30% ones) does not depend on them.

    Parameters
    ----------
    n, model, version, seed, rate, start_ts
        As in :class:`Scenario`.
    numeric, categorical
        How many features of each kind.
    shift_feature, shift_at
        The feature that shifts from prediction ``shift_at`` on: a numeric one moves its
        mean by ``shift_sd`` standard deviations; a categorical one swaps the frequencies
        of ``"a"`` and ``"c"``.
    """

    n: int = 300_000
    model: str = "wide"
    version: str = "1"
    seed: int = 7
    numeric: int = 16
    categorical: int = 4
    shift_feature: str | None = None
    shift_at: int = 100_000
    shift_sd: float = 0.5
    rate: float = 10.0
    start_ts: float = 1_763_800_000.0


def simulate_wide(s: WideScenario, chunk: int = 10_000) -> Iterator[SimEvent]:
    """Yield the scenario's predictions in order (numpy draws, one chunk at a time).

    >>> events = list(simulate_wide(WideScenario(n=3, numeric=2, categorical=1)))
    >>> sorted(events[0].value["features"])
    ['c0', 'n0', 'n1']
    >>> [e.key for e in events]
    ['wide-7-0', 'wide-7-1', 'wide-7-2']
    """
    import numpy as np

    rng = np.random.default_rng(s.seed)
    means = np.arange(s.numeric, dtype=np.float64)
    sds = 1.0 + means / 4.0
    swapped = np.array(CATEGORY_P)[[2, 1, 0, 3, 4]]
    for start in range(0, s.n, chunk):
        size = min(chunk, s.n - start)
        index = np.arange(start, start + size)
        after = index >= s.shift_at
        numeric = rng.normal(means, sds, size=(size, s.numeric))
        cats = np.stack([rng.choice(len(CATEGORIES), size=size, p=CATEGORY_P)
                         for _ in range(s.categorical)], axis=1) if s.categorical else None
        if s.shift_feature is not None and after.any():
            kind, j = s.shift_feature[0], int(s.shift_feature[1:])
            if kind == "n":
                numeric[after, j] += s.shift_sd * sds[j]
            else:
                assert cats is not None
                cats[after, j] = rng.choice(len(CATEGORIES), size=int(after.sum()), p=swapped)
        predictions = rng.random(size) < 0.3
        confidence = rng.uniform(0.6, 1.0, size=size)
        for row in range(size):
            i = start + row
            features: dict[str, Any] = {f"n{j}": float(numeric[row, j]) for j in range(s.numeric)}
            if cats is not None:
                for j in range(s.categorical):
                    features[f"c{j}"] = CATEGORIES[cats[row, j]]
            prediction = int(predictions[row])
            c = float(confidence[row])
            event_id = f"{s.model}-{s.seed}-{i}"
            ts = s.start_ts + i / s.rate
            yield SimEvent("predictions", event_id, {
                "id": event_id, "model": s.model, "version": s.version, "ts": round(ts, 3),
                "features": features, "prediction": prediction,
                "scores": {str(prediction): c, str(1 - prediction): 1.0 - c},
            }, ts)
