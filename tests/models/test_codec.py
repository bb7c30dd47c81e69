"""Changelog encoding of ModelState: faithful round trip, allow-list unpickler."""

from __future__ import annotations

import os
import pickle
import random

import pytest

from models import codec
from models.errors import StateError
from models.join import ModelRecord
from models.monitor import ModelState
from models.performance import DETECTORS
from models.policy import PolicyBook, PolicyConfig


def records(seed: int, n: int, task: str = "classification") -> list[ModelRecord]:
    """Alternating prediction and outcome records, error rate 10 % then 40 %."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        confidence = rng.uniform(0.6, 1.0)
        wrong = rng.random() < (0.1 if i < n // 2 else 0.4)
        if task == "regression":
            label = rng.gauss(0.0, 1.0)
            prediction: object = label + rng.gauss(0.0, 0.1 if not wrong else 2.0)
        else:
            label, prediction = "1", "0" if wrong else "1"
        out.append(ModelRecord("p", "m", "1", "p0", (i, 0), [float(i), {"x": i}, prediction,
                                                             confidence]))
        out.append(ModelRecord("o", "m", "1", "l0", (i, 1),
                               [float(i) + 5, prediction, label, confidence, confidence, 5.0]))
    return out


def absorb_all(state: ModelState, recs: list[ModelRecord]) -> list[dict[str, object]]:
    return [event for r in recs if (event := state.absorb(r)) is not None]


def snapshot(state: ModelState) -> tuple[object, ...]:
    v = state.versions["1"]
    return (state.positions, state.replays_skipped, v.predictions_seen, v.outcomes_seen,
            v.correct, v.detections, v.delay_counts, v.performance.report(),
            v.estimate.get(), v.estimate.rolling(), v.policy.seq, v.policy.reference)


def book(detector: str = "ADWIN", task: str = "classification") -> PolicyBook:
    return PolicyBook(PolicyConfig(task=task, detector=detector, window=200, min_outcomes=100,
                                   cooldown_seconds=0.0))


def test_empty_state_round_trips() -> None:
    state = codec.loads(codec.dumps(ModelState("m", PolicyBook())))
    assert (state.model, state.versions, state.positions) == ("m", {}, {})


# Fixed (models/codec.py allow-list vs models/performance.py DETECTORS["PageHinkley"]): river's
# PageHinkley keeps a bound method (`_test_drift`), which pickles as builtins.getattr, which
# the unpickler refuses. Any ModelState with a PageHinkley version is written to the
# changelog but cannot be read back: "state refers to builtins.getattr, which is not
# allowed" after every restart or rebalance.
@pytest.mark.parametrize(("detector", "task"), [
    *[(name, "classification") for name in sorted(DETECTORS)],
    ("ADWIN", "regression"),
    ("PageHinkley", "regression"),
])
def test_restored_state_continues_exactly_like_the_original(detector: str, task: str) -> None:
    """Crash half-way, restore from the changelog blob, and finish: same result."""
    recs = records(seed=1, n=3000, task=task)
    half = len(recs) // 2
    original = ModelState("m", book(detector, task))
    absorb_all(original, recs[:half])

    restored = codec.loads(codec.dumps(original))
    assert snapshot(restored) == snapshot(original)
    assert absorb_all(restored, recs[half:]) == absorb_all(original, recs[half:])
    assert snapshot(restored) == snapshot(original)
    assert restored.versions["1"].performance.detector_name == detector


@pytest.mark.parametrize("forbidden", [os.system, eval, exec, getattr, __import__])
def test_refuses_callables_outside_the_allow_list(forbidden: object) -> None:
    with pytest.raises(StateError, match="which is not allowed"):
        codec.loads(pickle.dumps(forbidden))


def test_refusal_names_the_forbidden_global() -> None:
    with pytest.raises(StateError) as info:
        codec.loads(pickle.dumps(os.system))
    assert str(info.value) == "state refers to posix.system, which is not allowed"


class Exploit:
    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, ("echo pwned",))


def test_refuses_a_reduce_payload_without_running_it() -> None:
    with pytest.raises(StateError, match=r"posix\.system"):
        codec.loads(pickle.dumps(Exploit()))


def _short(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


# Fixed (models/codec.py, _Unpickler.find_class): the allow-list checks only the module, but
# with pickle protocol >= 4 `name` may be a dotted attribute path, so any global reachable
# from an allowed module gets through: ("models.codec", "pickle.loads"),
# ("collections", "_sys.modules"), ... A forged changelog record can therefore call any
# function. The payload below only calls sys.getrecursionlimit(), reached through
# models.codec -> pickle -> sys.
def test_refuses_globals_reached_through_a_dotted_name() -> None:
    payload = (b"\x80\x04" + _short("models.codec") + _short("pickle.sys.getrecursionlimit")
               + b"\x93)R.")  # STACK_GLOBAL, EMPTY_TUPLE, REDUCE, STOP
    with pytest.raises(StateError, match="not allowed"):
        result = codec.loads(payload)
        pytest.fail(f"allow-list bypassed: the payload called a function and got {result!r}")


@pytest.mark.parametrize(
    "raw", [b"", b"not a pickle", codec.dumps(ModelState("m", PolicyBook()))[:-7]])
def test_undecodable_bytes_raise_state_error(raw: bytes) -> None:
    with pytest.raises(StateError, match="cannot be decoded"):
        codec.loads(raw)


# Fixed (models/codec.py allow-list): once a model's own reference profile is built (after
# reference_size predictions) its state holds numpy arrays, which pickle names as
# numpy.dtype; the unpickler refused it, so a restarted worker could not read the model
# back (found by the kill -9 test, tests/streams/test_faults.py).
def test_state_with_a_built_reference_profile_round_trips() -> None:
    config = PolicyConfig(reference_size=100, drift_window=100)
    state = ModelState("m", PolicyBook(config))
    absorb_all(state, records(seed=2, n=400))
    data = state.versions["1"].data
    assert data.reference is not None
    restored = codec.loads(codec.dumps(state))
    assert restored.versions["1"].data.reference.fingerprint() == data.reference.fingerprint()
