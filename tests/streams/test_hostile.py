"""Hostile input on the real broker: 2% of a 100,000-event stream is built to hurt.

Messages over 1 MB, JSON nested thousands deep, invalid UTF-8, numbers beyond a double,
10,000 feature names in one event, timestamps decades away, and a flood of model names.
Each is dead-lettered under its reason, counted exactly, leaves every valid count exact,
and the worker's memory ends within 20% of a clean run over the same valid events. No
prediction id or feature value reaches the worker's log (which runs at INFO).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import orjson
from aiokafka.partitioner import DefaultPartitioner

from tests.streams.harness import Worker, new_prefix, produce, run, wait_until

NOW = float(int(time.time()))
N_VALID = 50_000  # predictions, each labelled: 100,000 valid events
N_BAD = 2_000  # 2%
PARTITIONS = 8
CAP = 8  # DRIFTWARDEN_MAX_MODEL_VERSIONS for these runs
SECRET = "s3cr3t-feature-value"
MODELS = ("fraud", "churn")


def _prediction(i: int, **fields: object) -> dict:
    doc = {"id": f"hv-{i}", "model": MODELS[i % 2], "version": "1", "ts": NOW + 0.01 * i,
           "features": {"amount": float(i % 977), "segment": SECRET}, "prediction": i % 2}
    doc.update(fields)
    return doc


def _label(i: int) -> dict:
    # Every tenth prediction of each model is wrong.
    return {"id": f"hv-{i}", "label": (1 - i % 2) if i % 20 < 2 else i % 2,
            "ts": NOW + 0.01 * i + 1.0}


def _nested(depth: int) -> bytes:
    return b'{"id": "x", "features": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


# (topic, reason, make(k) -> value): the kinds of hostile event, in turn.
KINDS: list[tuple[str, str, Callable[[int], bytes]]] = [
    ("predictions", "oversized",
     lambda k: orjson.dumps(_prediction(-k, features={"blob": "z" * 1_100_000}))),
    ("predictions", "too_deep", lambda k: _nested(5_000)),
    ("labels", "invalid_utf8", lambda k: b'{"id": "hv-bad-\xff\xfe", "label": 1}'),
    ("predictions", "non_finite",
     lambda k: orjson.dumps(_prediction(-k)).replace(b'"amount":', b'"amount":1e999,"x":')),
    ("predictions", "too_many_features",
     lambda k: orjson.dumps(_prediction(-k, features={f"f{j}": j for j in range(10_000)}))),
    ("predictions", "ts_out_of_range",
     lambda k: orjson.dumps(_prediction(-k, ts=1.0 if k % 2 else 4.0e10))),
    ("labels", "ts_out_of_range",
     lambda k: orjson.dumps({"id": f"hv-ts-{k}", "label": 1, "ts": 1.0})),
    ("predictions", "too_many_models",
     lambda k: orjson.dumps(_prediction(-k, model=f"flood-{k}"))),
]


def _stream(hostile: bool) -> tuple[list[tuple[str, bytes, bytes]], Counter[tuple[str, str]]]:
    """Records (logical topic, key, value) and the dead letters expected per reason."""
    out: list[tuple[str, bytes, bytes]] = []
    expected: Counter[tuple[str, str]] = Counter()
    partitioner = DefaultPartitioner()
    every = list(range(PARTITIONS))
    followed: dict[int, set[str]] = {p: set() for p in every}  # model versions per partition
    stride = (N_VALID - 100) // N_BAD  # after the first 100, which every partition sees
    k = 0
    for i in range(N_VALID):
        p = _prediction(i)
        key = p["id"].encode()
        followed[partitioner(key, every, every)].add(p["model"])
        out.append(("predictions", key, orjson.dumps(p)))
        out.append(("labels", key, orjson.dumps(_label(i))))
        if hostile and i >= 100 and (i - 100) % stride == 0 and k < N_BAD:
            topic, reason, make = KINDS[k % len(KINDS)]
            key = f"hb-{k}".encode()
            out.append((topic, key, make(k)))
            if reason == "too_many_models":
                # A flood name is refused once its partition follows CAP model versions.
                seen = followed[partitioner(key, every, every)]
                if len(seen) >= CAP:
                    expected[topic, reason] += 1
                else:
                    seen.add(f"flood-{k}")
            else:
                expected[topic, reason] += 1
            k += 1
    assert k == N_BAD or not hostile
    return out, expected


def _absorbed(worker: Worker) -> bool:
    return all(worker.value("driftwarden_outcomes_total", model=m, version="1") == N_VALID // 2
               for m in MODELS)


def _rss(worker: Worker) -> int:
    assert worker.proc is not None
    with open(f"/proc/{worker.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _run(kafka_broker: str, tmp_path, hostile: bool) -> tuple[Worker, Counter, int]:
    prefix = new_prefix()
    records, expected = _stream(hostile)
    worker = Worker(kafka_broker, prefix, tmp_path, env_extra={
        "DRIFTWARDEN_PARTITIONS": str(PARTITIONS), "DRIFTWARDEN_MAX_MODEL_VERSIONS": str(CAP)})
    worker.start()
    try:
        run(produce(kafka_broker, [(prefix + t, k, v) for t, k, v in records]))
        n_dead = sum(expected.values())
        try:
            wait_until(lambda: _absorbed(worker)
                       and worker.total("driftwarden_dead_letters_total") >= n_dead,
                       300, f"{N_VALID} outcomes and {n_dead} dead letters")
        except AssertionError as exc:
            seen = {k: v for k, v in worker.metrics().items() if "driftwarden_dead" in k[0]}
            raise AssertionError(f"{exc}; the worker reports {seen}") from None
        time.sleep(2.0)  # let anything still in flight show up in the counts
        return worker, expected, _rss(worker)
    except BaseException:
        worker.stop()
        raise


def test_hostile_input_is_dead_lettered_exactly_and_costs_no_memory(kafka_broker, tmp_path):
    clean, _, clean_rss = _run(kafka_broker, tmp_path, hostile=False)
    clean.stop()
    worker, expected, rss = _run(kafka_broker, tmp_path, hostile=True)
    try:
        pid = worker.proc.pid
        assert {reason for _, reason in expected} == {reason for _, reason, _ in KINDS}
        assert 0 < expected["predictions", "too_many_models"] < N_BAD // len(KINDS)

        counted = {(dict(labels)["topic"], dict(labels)["reason"]): v
                   for (name, labels), v in worker.metrics().items()
                   if name == "driftwarden_dead_letters_total"}
        assert counted == {key: float(n) for key, n in expected.items()}
        for m in MODELS:
            mv = {"model": m, "version": "1"}
            assert worker.value("driftwarden_predictions_total", **mv) == N_VALID // 2
            assert worker.value("driftwarden_outcomes_total", **mv) == N_VALID // 2
            assert worker.value("driftwarden_accuracy", window="cumulative", **mv) == 0.9

        assert worker.proc.poll() is None and worker.proc.pid == pid
        print(f"worker RSS: clean run {clean_rss / 2**20:.1f} MiB, hostile run "
              f"{rss / 2**20:.1f} MiB ({rss / clean_rss:.3f}x)")
        assert rss <= 1.2 * clean_rss, (rss, clean_rss)
        # Ids and feature values stay out of the log, whatever the event.
        for log in (clean.log_text(), worker.log_text()):
            assert "Traceback" not in log
            assert "hv-" not in log and "hb-" not in log and SECRET not in log
    finally:
        worker.stop()
