"""Bad input on the real broker: dead-lettered with a reason, counted, nothing else lost.

A corpus of malformed and inconsistent events is interleaved with a valid labelled stream.
Each bad event must reach ``dead-letters`` byte for byte with the ``dw.*`` headers, be
counted under its reason, leave every valid count exact, and never restart the worker.
"""

from __future__ import annotations

import time
from collections import Counter

import orjson

from models.join import ModelRecord, encode_records
from tests.streams.harness import produce, read_topic, run, wait_until

TTL = 60.0
NOW = float(int(time.time()))
N_VALID = 400


def _prediction(i: int) -> dict:
    return {"id": f"v-{i}", "model": "fraud", "version": "1", "ts": NOW + 0.5 * i,
            "features": {"amount": float(i), "country": "DE"}, "prediction": i % 2,
            "scores": {"0": 0.2, "1": 0.8} if i % 2 else {"0": 0.8, "1": 0.2}}


def _label(i: int, **extra: object) -> dict:
    # Every tenth prediction is wrong: accuracy is known exactly.
    label = (1 - i % 2) if i % 10 == 0 else i % 2
    return {"id": f"v-{i}", "label": label, "ts": NOW + 0.5 * i + 1.0, **extra}


def _bad(event_id: str, **fields: object) -> bytes:
    doc = {"id": event_id, "model": "fraud", "version": "1", "ts": NOW,
           "features": {"amount": 1.0}, "prediction": 1}
    doc.update(fields)
    return orjson.dumps({k: v for k, v in doc.items() if v is not _MISSING})


_MISSING = object()

# (topic, key, value, expected reason): at least one of every kind of bad input.
BAD_PREDICTIONS: list[tuple[bytes, bytes | None, str]] = [
    (b"b-trunc", b'{"id": "b-trunc", "model": "fraud", "feat', "invalid_json"),
    (b"b-empty", b"", "invalid_json"),
    (b"b-null", None, "invalid_json"),  # a tombstone: its letter has no value either
    (b"b-utf8", b'\xff\xfe{"id": "b-utf8"}', "invalid_utf8"),
    (b"b-list", b"[1, 2, 3]", "not_an_object"),
    (b"b-str", b'"just a string"', "not_an_object"),
    (b"b-deep", b"[" * 1100 + b"]" * 1100, "too_deep"),
    (b"b-noid", _bad("x", id=_MISSING), "missing_id"),
    (b"b-emptyid", _bad(""), "invalid_id"),
    (b"b-longid", _bad("x" * 300), "invalid_id"),
    (b"b-nan", _bad("b-nan").replace(b'"amount":1.0', b'"amount":NaN'), "non_finite"),
    (b"b-inf", _bad("b-inf").replace(b'"prediction":1', b'"prediction":Infinity'),
     "non_finite"),
    (b"b-hugestr", _bad("b-hugestr", features={"note": "a" * 5000}), "invalid_features"),
    (b"b-oversized", _bad("b-oversized", blob="z" * 1_100_000), "oversized"),  # letter cut
    (b"b-intmodel", _bad("b-intmodel", model=5), "invalid_model"),
    (b"b-nomodel", _bad("b-nomodel", model=_MISSING), "missing_model"),
    (b"b-featlist", _bad("b-featlist", features=[1, 2]), "invalid_features"),
    (b"b-nofeat", _bad("b-nofeat", features=_MISSING), "missing_features"),
    (b"b-predobj", _bad("b-predobj", prediction={"a": 1}), "invalid_prediction"),
    (b"b-nopred", _bad("b-nopred", prediction=_MISSING), "missing_prediction"),
    (b"b-scores", _bad("b-scores", scores={"0": 0.5, "1": "x"}), "invalid_scores"),
    (b"b-ts", _bad("b-ts", ts="yesterday"), "invalid_ts"),
    (b"b-ts0", _bad("b-ts0", ts=0), "ts_out_of_range"),
    (b"b-wide", _bad("b-wide", features={f"f{i}": i for i in range(1001)}),
     "too_many_features"),
    (b"b-version", _bad("b-version", version=[]), "invalid_version"),
]
BAD_LABELS: list[tuple[bytes, bytes | None, str]] = [
    (b"b-lnolabel", b'{"id": "b-lnolabel"}', "missing_label"),
    (b"b-llist", b'{"id": "b-llist", "label": [1]}', "invalid_label"),
    (b"b-ltrunc", b'{"id": "b-ltrunc", "lab', "invalid_json"),
]


def _stream() -> tuple[list[tuple[str, bytes | None, bytes | None]],
                       Counter[tuple[str, str]]]:
    """The produced records (logical topic, key, value) and the expected dead letters."""
    out: list[tuple[str, bytes | None, bytes | None]] = []
    expected: Counter[tuple[str, str]] = Counter()
    # A label that arrives first and whose prediction never comes: once the predictions
    # on its partition are TTL seconds newer, it is dead-lettered as unmatched.
    ghost = orjson.dumps({"id": "ghost", "label": 1, "ts": NOW})
    out.append(("labels", b"ghost", ghost))
    expected["labels", "unmatched_label"] += 1
    # The same, keyed other than by id (not UTF-8; none at all): the dead letter keeps
    # the key it came with.
    for key, event_id in ((b"\xfe\xff-tenant", "ghost-bin"), (None, "ghost-nokey")):
        out.append(("labels", key, orjson.dumps({"id": event_id, "label": 0, "ts": NOW})))
        expected["labels", "unmatched_label"] += 1
    # A label that arrives first and is then joined: a valid outcome, not a dead letter.
    out.append(("labels", b"early", orjson.dumps({"id": "early", "label": 1, "ts": NOW})))

    bad_p, bad_l = iter(BAD_PREDICTIONS), iter(BAD_LABELS)
    for i in range(N_VALID):
        p = _prediction(i)
        out.append(("predictions", p["id"].encode(), orjson.dumps(p)))
        if i == 7:  # a label naming another model, before the right one
            out.append(("labels", b"v-7", orjson.dumps(_label(7, model="other"))))
            expected["labels", "model_mismatch"] += 1
        out.append(("labels", p["id"].encode(), orjson.dumps(_label(i))))
        if i == 5:
            out.append(("predictions", b"v-5", orjson.dumps(_prediction(5))))
            expected["predictions", "duplicate_prediction"] += 1
        if i == 6:
            out.append(("labels", b"v-6", orjson.dumps(_label(6))))
            expected["labels", "duplicate_label"] += 1
        if i == 3:
            early = {**_prediction(3), "id": "early", "prediction": 1}
            out.append(("predictions", b"early", orjson.dumps(early)))
        if i % 10 == 9:
            item = next(bad_p, None)
            if item is not None:
                out.append(("predictions", item[0], item[1]))
                expected["predictions", item[2]] += 1
            item = next(bad_l, None)
            if item is not None:
                out.append(("labels", item[0], item[1]))
                expected["labels", item[2]] += 1
    assert next(bad_p, None) is None and next(bad_l, None) is None  # all interleaved
    return out, expected


def test_bad_input_is_dead_lettered_counted_and_harmless(start_worker, kafka_broker, prefix):
    records, expected = _stream()
    assert len({reason for _, reason in expected}) >= 15
    worker = start_worker(DRIFTWARDEN_LABEL_TTL_SECONDS=str(int(TTL)))
    pid = worker.proc.pid
    run(produce(kafka_broker, [(prefix + t, k, v) for t, k, v in records]))

    n_dead = sum(expected.values())
    try:
        wait_until(lambda: worker.total("driftwarden_dead_letters_total") >= n_dead
                   and worker.value("driftwarden_outcomes_total", model="fraud", version="1")
                   >= N_VALID + 1, 120, f"{n_dead} dead letters and {N_VALID + 1} outcomes")
    except AssertionError as exc:
        seen = {k: v for k, v in worker.metrics().items() if "driftwarden" in k[0]}
        raise AssertionError(f"{exc}; the worker reports {seen}") from None

    # Counted per reason, exactly.
    counted = {(dict(labels)["topic"], dict(labels)["reason"]): v
               for (name, labels), v in worker.metrics().items()
               if name == "driftwarden_dead_letters_total"}
    assert counted == {key: float(n) for key, n in expected.items()}

    # Valid neighbours are unaffected: every valid prediction joined, accuracy exact.
    mv = {"model": "fraud", "version": "1"}
    assert worker.value("driftwarden_predictions_total", **mv) == N_VALID + 1
    assert worker.value("driftwarden_outcomes_total", **mv) == N_VALID + 1
    assert worker.value("driftwarden_pending_labels") == 0
    assert worker.value("driftwarden_accuracy", window="cumulative", **mv) == (
        (N_VALID - N_VALID // 10 + 1) / (N_VALID + 1))

    # Every input event counts once, bad or good: received as its batch begins, consumed
    # once stored. The model stage counts each message of the records topic it absorbed.
    produced = Counter(topic for topic, _, _ in records)
    for topic in ("predictions", "labels"):
        assert worker.value("driftwarden_events_received_total", topic=topic) == produced[topic]
        assert worker.value("driftwarden_events_consumed_total", topic=topic) == produced[topic]

    def records_absorbed() -> bool:
        n = len(run(read_topic(kafka_broker, prefix + "driftwarden-model-records", idle=1.0)))
        return n > 0 and worker.value("driftwarden_events_consumed_total",
                                      topic="model-records") == n

    wait_until(records_absorbed, 60, "the model stage to count every records message")

    # Each dead letter carries the original key and bytes, and points at the original.
    sources = {}
    for topic in ("predictions", "labels"):
        for r in run(read_topic(kafka_broker, prefix + topic, idle=2.0)):
            sources[prefix + topic, r.partition, r.offset] = (r.key, r.value)
    letters = run(read_topic(kafka_broker, prefix + "dead-letters", idle=3.0))
    assert len(letters) == n_dead
    seen: Counter[tuple[str, str]] = Counter()
    cut = 0
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers}
        origin = (headers["dw.origin.topic"], int(headers["dw.origin.partition"]),
                  int(headers["dw.origin.offset"]))
        key, value = sources[origin]
        if value is not None and len(value) > 1_000_000:  # the start, and its length
            assert headers.pop("dw.truncated") == str(len(value))
            value = value[:1_000_000]
            cut += 1
        assert set(headers) == {"dw.origin.topic", "dw.origin.partition", "dw.origin.offset",
                                "dw.reason"}
        assert (key, value) == (letter.key, letter.value), headers
        seen[origin[0].removeprefix(prefix), headers["dw.reason"]] += 1
    assert seen == expected
    assert cut == 1  # b-oversized

    # The worker never restarted.
    assert worker.proc.poll() is None and worker.proc.pid == pid
    assert "Traceback" not in worker.log_text()


def test_a_records_message_the_model_stage_cannot_read_is_dead_lettered_and_undone(
        start_worker, kafka_broker, prefix, tmp_path):
    """The internal records topic has one writer, the join; a message another writer (or
    a later release) put there used to stop the worker at it on every restart. Each is
    now dead-lettered whole, and the model's state is as if it never came: here one
    fails part-way, after its first outcome was absorbed, between valid messages."""
    topic = prefix + "driftwarden-model-records"
    policy = tmp_path / "policy.toml"
    policy.write_text('[models.reg]\ntask = "regression"\n')
    worker = start_worker(DRIFTWARDEN_ROLE="monitor", DRIFTWARDEN_POLICY_FILE=str(policy))
    pid = worker.proc.pid

    def outcome(k: int) -> ModelRecord:
        # From join partition 0's batch k; every fourth wrong, and k = 10 too.
        wrong = k % 4 == 0 or k == 10
        return ModelRecord("o", "fraud", "1", "o0", (k, 0),
                           [NOW + k, "1", "0" if wrong else "1", None, None, 1.0])

    def message(*records: ModelRecord) -> bytes:
        [(_, raw)] = encode_records(list(records))
        return raw

    partial = message(outcome(10)).replace(b"]]]", b']],["o","1","o0",10,1,"garbage"]]')
    sent: list[tuple[bytes | None, bytes]] = [
        (b"fraud", message(*map(outcome, range(10)))),
        (b"fraud", partial),                                       # undone: outcome 10
        (b"fraud", message(*map(outcome, range(11, 20)))),
        (b"fraud", b"\x00not json"),                              # unparseable
        (None, message(outcome(30))),                              # no key: no model
        (b"fraud", b'[["zz"]]'),                                   # an entry of no kind
        (b"fraud", message(*map(outcome, range(20, 30)))),
        # A regression model's outcomes where the join took a class (its policy file
        # said otherwise): the one it cannot score is skipped, and the log says so.
        (b"reg", message(*(ModelRecord("o", "reg", "1", "o0", (k, 0),
                                       [NOW + k, 2.0, label, None, None, 1.0])
                           for k, label in enumerate([1.0, "yes", 4.0])))),
    ]
    bad = {1, 3, 4, 5}
    run(produce(kafka_broker, [(topic, key, value) for key, value in sent]))
    wait_until(lambda: worker.value("driftwarden_events_consumed_total",
                                    topic="model-records") == len(sent), 60,
               f"the model stage to take all {len(sent)} records messages")

    # Outcomes 0-9 and 11-29, none of outcome 10: 8 of 29 wrong (0, 4, ..., 28).
    mv = {"model": "fraud", "version": "1"}
    assert worker.value("driftwarden_outcomes_total", **mv) == 29
    assert worker.value("driftwarden_accuracy", window="cumulative", **mv) == 21 / 29
    assert worker.value("driftwarden_dead_letters_total", topic="model-records",
                        reason="invalid_record") == len(bad)
    assert worker.value("driftwarden_outcomes_total", model="reg", version="1") == 2
    assert worker.value("driftwarden_mae", model="reg", version="1") == 1.5

    letters = run(read_topic(kafka_broker, prefix + "dead-letters", idle=2.0))
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers}
        assert (headers["dw.origin.topic"], headers["dw.reason"]) == (topic, "invalid_record")
    # Each whole, with its key (the keyless one may be on a partition of its own).
    assert (sorted(((r.key, r.value) for r in letters), key=repr)
            == sorted((sent[i] for i in bad), key=repr))
    log = worker.log_text()
    assert log.count("dead-lettered as invalid_record") == len(bad)
    assert "ValueError at models/monitor.py:" in log  # where the partial message failed
    assert "model 'reg': 1 outcomes skipped (1 in all): their version monitors a" in log
    assert "Traceback" not in log
    assert worker.proc.poll() is None and worker.proc.pid == pid


def test_a_stored_state_that_cannot_be_read_back_stops_the_worker_naming_the_model(
        start_worker, kafka_broker, prefix):
    """A later release's (or a corrupted) state in the models changelog: the model stage
    refuses it by name, rather than start the model afresh and overwrite it."""
    topic = prefix + "driftwarden-model-records"
    first = start_worker(DRIFTWARDEN_ROLE="monitor")
    first.stop()
    run(produce(kafka_broker, [(prefix + "driftwarden-models-changelog", b"fraud",
                                b"\x80\x05not a state")]))
    worker = start_worker(DRIFTWARDEN_ROLE="monitor")
    [(_, raw)] = encode_records([ModelRecord("o", "fraud", "1", "o0", (1, 0),
                                             [NOW, "1", "1", None, None, 1.0])])
    run(produce(kafka_broker, [(topic, b"fraud", raw)]))
    wait_until(lambda: worker.proc.poll() is not None, 60, "the worker to stop")
    assert worker.proc.returncode != 0
    assert ("the models table's state of model 'fraud' cannot be read back"
            in worker.log_text())
