"""The oracle the fault-injection tests compare a worker with: computed in-process.

Counts come straight from the seeded input (each simulated label knows whether its
prediction was right); the retraining event ids come from running ``models/`` over the
same input in one process, in generation order, with nothing killed.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from models.join import JoinPartition
from models.monitor import ModelState
from models.policy import PolicyBook
from models.simulation import Scenario, SimEvent, simulate

TTL = 7 * 86400.0  # the worker's default DRIFTWARDEN_LABEL_TTL_SECONDS


@dataclass
class Expected:
    """What a worker must end up with, per model."""

    predictions: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    correct: Counter[str] = field(default_factory=Counter)
    retraining_ids: set[str] = field(default_factory=set)

    @property
    def pending(self) -> int:
        return sum(self.predictions.values()) - sum(self.outcomes.values())


def merged(scenarios: Iterable[Scenario]) -> list[SimEvent]:
    """The scenarios' events interleaved in event-time order, as services would publish."""
    return list(heapq.merge(*(simulate(s) for s in scenarios), key=lambda e: e.ts))


def records(prefix: str, events: Iterable[SimEvent]) -> list[tuple[str, bytes, bytes]]:
    return [(prefix + e.topic, e.key.encode(), orjson.dumps(e.value)) for e in events]


def oracle(events: list[SimEvent], batch: int = 1000) -> Expected:
    expected = Expected()
    model_of: dict[str, str] = {}
    for e in events:
        if e.topic == "predictions":
            model_of[e.key] = e.value["model"]
            expected.predictions[e.value["model"]] += 1
        else:
            model = model_of[e.key]
            expected.outcomes[model] += 1
            expected.correct[model] += bool(e.correct)
    join = JoinPartition({}, partition=0, ttl=TTL)
    states: dict[str, ModelState] = {}
    offsets = {"predictions": 0, "labels": 0}
    for i, e in enumerate(events):
        join.absorb(e.topic, orjson.dumps(e.value), offsets[e.topic], e.ts)
        offsets[e.topic] += 1
        if (i + 1) % batch == 0 or i + 1 == len(events):
            for rec in join.drain().records:
                state = states.setdefault(rec.model, ModelState(rec.model, PolicyBook()))
                fired = state.absorb(rec)
                if fired is not None:
                    expected.retraining_ids.add(fired["id"])
    return expected
