"""The prediction/label join for one input partition, over a key-value store.

The worker keeps one :class:`JoinPartition` per assigned partition of the co-partitioned
``predictions`` and ``labels`` topics. Its ``store`` is the worker's table (a plain dict
in tests); values are compact orjson lists so a pending prediction costs few bytes:

=========  ==============================================================
kind       value
=========  ==============================================================
``P``      pending prediction ``["P", ts, partition, model, version, prediction, scores]``
``L``      label seen before its prediction ``["L", ts, partition, label, model, offset, raw]``,
           plus, when the first label names a model, later labels for the same id as
           ``[[ts, label, model, offset, raw], ...]`` at index 7: until the prediction
           says which model is right, a label naming another one must not shut out a
           correct label that follows it. A label whose Kafka key is not its ``id``
           (DESIGN.md keys labels by id) keeps that key, for its dead letter: at index
           8 for the first (index 7 then ``[]`` if no later one), as a sixth item for a
           later one; a string of the key's bytes as Latin-1, or null for no key
``D``      matched, ``["D", ts, partition]``: kept to spot duplicates, until the TTL runs
           out (or a shorter ``duplicate_window``)
=========  ==============================================================

Per partition a meta entry records the source offsets absorbed (replays at or below them
are skipped: DESIGN.md section 5), the event-time watermark of each side, the counters
and the number of batches drained. Entries expire by event time, judged by the side they
wait for: a pending prediction expires once the labels seen on its partition are more
than ``ttl`` seconds newer than it; a pending label once the predictions are; a ``D``
marker once both are ``duplicate_window`` seconds newer. So a topic consumed ahead of
the other (a backlog, a lagging partition) never expires entries whose partner simply
has not been read yet.

Crash safety. A batch changes many keys, and Kafka makes only single messages atomic, so
:meth:`JoinPartition.drain` hands over, in the order they must reach Kafka (a
:class:`Flush`):

1. the ``p`` records and the dead letters of unparseable events. Both follow from each
   event's bytes alone, so a replay after a crash sends them again identically and the
   model stage skips them by position;
2. one write-ahead entry (``wal``) holding every changed key, the ``o`` records and the
   other dead letters. Which label meets which prediction first depends on how the two
   topics interleave, which a replay need not repeat; so these are sent only once the
   write-ahead entry is stored, and re-sent from it after a crash;
3. the ``o`` records and those dead letters;
4. the changed keys themselves, the meta entry last.

A partition opened over a store whose write-ahead entry is newer than its meta entry
(the worker died during 3 or 4) applies it and offers its records again as
:attr:`JoinPartition.recovered`. ``o`` records are positioned by batch, ``("o3",
(batch, i))``, so that the model stage skips exactly those it already absorbed.

Examples
--------
>>> store = {}
>>> part = JoinPartition(store, partition=0, ttl=60.0)
>>> part.absorb("predictions", b'{"id": "a", "model": "m", "features": {"x": 1},'
...             b' "prediction": 1, "ts": 100}', offset=0, kafka_ts=100.0)
>>> part.absorb("labels", b'{"id": "a", "label": 1, "ts": 130}', offset=0, kafka_ts=130.0)
>>> [(r.kind, r.model, r.version) for r in part.records]
[('p', 'm', '0'), ('o', 'm', '0')]
>>> part.records[1].item[-1]  # label delay in seconds
30.0
>>> part.absorb("labels", b'{"id": "a", "label": 1}', offset=0, kafka_ts=131.0)  # replay
>>> part.skipped, part.counts["matched"]
(1, {'m|0': 1})
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Collection, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from itertools import accumulate, groupby
from operator import lt
from typing import Any, NamedTuple

import orjson

from models import schema
from models.columns import FeatureColumns, OutcomeRun, PredictionRun
from models.errors import InvalidEvent, StateError
from models.events import (
    DEFAULT_LIMITS,
    Label,
    Limits,
    Prediction,
    class_key,
    parse_label,
    parse_prediction,
    regression_number,
)

__all__ = ["RECORDS_MESSAGE_BYTES", "RUN_MIN", "DeadLetter", "Flush", "InputRecord",
           "JoinPartition", "ModelRecord", "count_key", "decode_records", "encode_records",
           "expiry_heaps", "meta_key", "outcome_records", "run_records", "split_count_key",
           "wal_key"]

PREDICTIONS = "predictions"
LABELS = "labels"
_SOURCE_CODE = {PREDICTIONS: "p", LABELS: "l"}
_NEVER = float("-inf")
# Labels of one id that may wait for its prediction, and the bytes their entry may reach:
# a stream of retries must not grow one entry (rewritten each time, and one changelog
# message) without bound. Further labels are dead-lettered at once as duplicates.
MAX_WAITING_LABELS = 8
MAX_WAITING_BYTES = 1 << 20


class InputRecord(NamedTuple):
    """An input record, with what the join reads of it: aiokafka's ``ConsumerRecord``
    has these attributes (and more), and :meth:`JoinPartition.absorb_many` takes either."""

    offset: int
    timestamp: int  # milliseconds, as Kafka keeps it
    key: bytes | None
    value: bytes | None


def meta_key(partition: int) -> str:
    """Store key of a partition's meta entry (cannot collide with an id: ids are JSON text)."""
    return f"\x00meta:{partition}"


def wal_key(partition: int) -> str:
    """Store key of a partition's write-ahead entry (see the module docstring)."""
    return f"\x00wal:{partition}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Original bytes that could not be used, with where they came from and why."""

    topic: str  # logical topic: "predictions", "labels", "references" or "model-records"
    partition: int
    offset: int
    reason: str
    raw: bytes | None  # None: the record had no value (a tombstone), and nor does its letter
    key: bytes | None = None
    # True when the reason depends on the join's state rather than on the bytes alone.
    stateful: bool = field(default=False, compare=False)


@dataclass(slots=True)  # not frozen: a frozen dataclass takes 0.6 us to make, this 0.15
class ModelRecord:
    """What the join hands to the per-model stage, tagged for idempotent absorption.

    ``source`` and ``position`` identify the input event that produced the record
    (``"p3"`` = predictions partition 3; position = ``(offset, sub)``); the model stage
    skips any record at or below the position it already absorbed from that source.

    ``item`` for kind ``"p"``: ``[ts, features, prediction, confidence]``;
    for kind ``"o"``: ``[ts, prediction, label, p_label, confidence, delay]``.

    ``raw``, for a ``"p"`` record made by the join, is the prediction event's bytes: the
    records topic carries them as they came (:func:`encode_records`) rather than the
    features encoded again.
    """

    kind: str
    model: str
    version: str
    source: str
    position: tuple[int, int]
    item: list[Any]
    raw: bytes | None = field(default=None, compare=False, repr=False)


#: Most bytes of one records message (:func:`encode_records` splits a model's records
#: into several beyond it): under the broker's default ``message.max.bytes`` (1 MiB),
#: which the records topic keeps.
RECORDS_MESSAGE_BYTES = 900_000
#: Records in a model's first message of a batch, before their size per record is known.
_FIRST_MESSAGE_RECORDS = 256
#: Fewer consecutive predictions than this travel a record each, not as a run: a run's
#: columns cost a numpy call each, which a few predictions do not repay.
RUN_MIN = 16
#: Bytes a run's entry may take per prediction beyond the event's own: its offset,
#: timestamp, prediction and confidence, and per feature what a value may grow by when
#: written again (a float's base64 is 11 bytes; in a list of values, orjson writes
#: ``1e15`` as ``1000000000000000.0`` and any number in at most 24).
_RUN_ENTRY_BYTES, _RUN_VALUE_BYTES = 64, 24


def encode_records(records: list[ModelRecord], limit: int = RECORDS_MESSAGE_BYTES,
                   runs: bool = True) -> list[tuple[str, bytes]]:
    """Records as the model stage receives them: orjson messages ``(model, value)``, each
    model's in order, a message at most ``limit`` bytes unless one entry alone is more.

    With ``runs``, ``RUN_MIN`` or more consecutive predictions of a version from one
    source partition that all name the same features travel as one ``"c"`` entry, their
    features as columns (:class:`models.columns.PredictionRun`), each entry at most
    ``limit / 2`` bytes by an upper bound of its size. Other predictions with their
    event's bytes travel as kind ``"e"``, the event in place of the features: embedding
    the validated bytes (``orjson.Fragment``) costs a tenth of encoding the features
    again (their floats dominate). ``RUN_MIN`` or more consecutive outcomes of a version
    from one source and batch travel as one ``"oc"`` entry
    (:class:`models.columns.OutcomeRun`), halved until a message holds it. Without
    ``runs`` no ``"c"`` or ``"oc"`` entry is made: the form releases before runs read.

    >>> record = ModelRecord("p", "m", "1", "p0", (7, 0), [1.0, {}, 1, None])
    >>> [(model, raw)] = encode_records([record])
    >>> model, raw
    ('m', b'[["p","1","p0",7,0,[1.0,{},1,null]]]')
    >>> list(decode_records(model, raw))[0].position
    (7, 0)
    >>> event = b'{"id":"a","model":"m","features":{"x":0.1},"prediction":1}'
    >>> record = ModelRecord("p", "m", "1", "p0", (8, 0), [2.0, {"x": 0.1}, 1, None], raw=event)
    >>> [(_, raw)] = encode_records([record])
    >>> raw
    b'[["e","1","p0",8,0,[2.0,{"id":"a","model":"m","features":{"x":0.1},"prediction":1},1,null]]]'
    >>> list(decode_records("m", raw))[0].item
    [2.0, {'x': 0.1}, 1, None]
    >>> run = [ModelRecord("p", "m", "1", "p0", (i, 0), [float(i), {"x": i / 4}, 1, None])
    ...        for i in range(RUN_MIN)]
    >>> [(_, raw)] = encode_records(run)
    >>> [decoded] = decode_records("m", raw)
    >>> decoded.offsets[:3], decoded.features.columns["x"][:3]
    ([0, 1, 2], array([0.  , 0.25, 0.5 ]))
    >>> [(_, raw)] = encode_records(run, runs=False)
    >>> raw.count(b'["p",')
    16
    """
    by_model: dict[str, list[ModelRecord]] = {}
    for r in records:
        by_model.setdefault(r.model, []).append(r)
    out: list[tuple[str, bytes]] = []
    for model, of_model in by_model.items():
        items = _entries(of_model, limit // 2) if runs else list(map(_entry, of_model))
        # Each message is encoded once, sized from the bytes per entry of the last one
        # (aiming at 90% of the limit); one that comes out too large is encoded again,
        # smaller. Halving a batch's worth until the halves fit encoded it ~3x over.
        start, count = 0, _FIRST_MESSAGE_RECORDS
        while start < len(items):
            part = items[start:start + count]
            raw = orjson.dumps(part)
            count = max(1, len(part) * limit * 9 // (10 * len(raw)))
            if len(raw) > limit and len(part) == 1 and part[0][0] == "oc" and len(part[0][4]) > 1:
                items[start:start + 1] = OutcomeRun.halves(part[0])  # labels of any size
                continue
            if len(raw) <= limit or len(part) == 1:
                out.append((model, raw))
                start += len(part)
    return out


def _entries(records: list[ModelRecord], run_bytes: int) -> list[Any]:
    """One model's records as message entries: runs of predictions, the rest one each."""
    entries: list[Any] = []
    i = 0
    # Spans of records alike: predictions of one version and source with as many
    # features (cheaper to compare than their names: _run splits by names when needed),
    # outcomes of one version, source and batch, or other records (None: one each).
    for key, group in groupby(
            [("p", r.version, r.source, r.position[1], len(r.item[1])) if r.kind == "p"
             else ("o", r.version, r.source, r.position[0]) if r.kind == "o" else None
             for r in records]):
        span = records[i:i + len(list(group))]
        i += len(span)
        if key is None or len(span) < RUN_MIN or (key[0] == "p" and key[3] != 0):
            entries += map(_entry, span)
            continue
        if key[0] == "o":
            _outcome_run(span, entries)
            continue
        offsets = [r.position[0] for r in span]
        if not all(map(lt, offsets, offsets[1:])):  # not made by the join: one each
            entries += map(_entry, span)
            continue
        # Cut where the entry would pass run_bytes (by an upper bound of its size).
        ends = list(accumulate(
            _RUN_ENTRY_BYTES + _RUN_VALUE_BYTES * len(r.item[1])
            + (0 if r.raw is None else len(r.raw)) for r in span))
        start = 0
        while start < len(span):
            base = ends[start - 1] if start else 0
            end = max(start + 1, bisect.bisect_right(ends, base + run_bytes, lo=start))
            _run(span[start:end], offsets[start:end], entries)
            start = end
    return entries


def _run(records: list[ModelRecord], offsets: list[int], entries: list[Any],
         split: bool = True) -> None:
    """Append ``records`` (predictions with as many features) as a run, or one each; as
    runs of those naming the same features (``split``) when they do not all."""
    items = [r.item for r in records]
    columns = FeatureColumns.from_rows([item[1] for item in items]) \
        if len(items) >= RUN_MIN else None
    if columns is None and split and len(items) >= RUN_MIN:
        start = 0  # one pass over the names (dict views compare as sets), no retries
        for _, group in groupby(item[1].keys() for item in items):
            end = start + len(list(group))
            _run(records[start:end], offsets[start:end], entries, split=False)
            start = end
        return
    if columns is None:
        entries += map(_entry, records)
        return
    ts, _, predictions, confidences = map(list, zip(*items, strict=True))
    first = records[0]
    entries.append(PredictionRun(first.version, first.source, offsets, ts, predictions,
                                 confidences, columns).encode())


def _outcome_run(records: list[ModelRecord], entries: list[Any]) -> None:
    """Append outcomes of one version, source and batch as one run (one each if their
    positions do not increase: not made by the join)."""
    subs = [r.position[1] for r in records]
    if not all(map(lt, subs, subs[1:])):
        entries += map(_entry, records)
        return
    first = records[0]
    entries.append(OutcomeRun(first.version, first.source, first.position[0], subs,
                              *map(list, zip(*(r.item for r in records), strict=True)))
                   .encode())


def _entry(r: ModelRecord) -> list[Any]:
    if r.raw is not None and r.kind == "p":
        ts, _, prediction, confidence = r.item
        return ["e", r.version, r.source, *r.position,
                [ts, orjson.Fragment(r.raw), prediction, confidence]]
    return [r.kind, r.version, r.source, *r.position, r.item]


def decode_records(model: str, raw: bytes,
                   ) -> Iterator[ModelRecord | PredictionRun | OutcomeRun]:
    """The records of one :func:`encode_records` message, for ``model``: a
    :class:`models.columns.PredictionRun` or :class:`models.columns.OutcomeRun` for each
    run, a ModelRecord for each other."""
    for entry in orjson.loads(raw):
        kind = entry[0]
        if kind == "c":
            yield PredictionRun.decode(entry)
            continue
        if kind == "oc":
            yield OutcomeRun.decode(entry)
            continue
        kind, version, source, offset, sub, item = entry
        if kind == "e":  # a prediction as its event: the features are the event's
            kind, item[1] = "p", item[1]["features"]
        yield ModelRecord(kind, model, version, source, (offset, sub), item)


def run_records(model: str, run: PredictionRun) -> list[ModelRecord]:
    """The ModelRecords of a run, as the join made them (less the event bytes)."""
    return [ModelRecord("p", model, run.version, run.source, (offset, 0),
                        [ts, features, prediction, confidence])
            for offset, ts, features, prediction, confidence in zip(
                run.offsets, run.ts, run.features.rows(), run.predictions, run.confidences,
                strict=True)]


def outcome_records(model: str, run: OutcomeRun) -> list[ModelRecord]:
    """The ModelRecords of an outcome run, as the join made them."""
    return [ModelRecord("o", model, run.version, run.source, (run.batch, sub), list(item))
            for sub, *item in zip(run.subs, run.ts, run.predictions, run.labels, run.p_labels,
                                  run.confidences, run.delays, strict=True)]


class Flush(NamedTuple):
    """What :meth:`JoinPartition.drain` hands over (module docstring: the order to send)."""

    records: list[ModelRecord]
    dead_letters: list[DeadLetter]
    writes: dict[str, bytes | None]  # changed store entries, None = deleted
    wal: bytes | None  # the write-ahead entry, stored under wal_key(partition)

    def early(self) -> tuple[list[ModelRecord], list[DeadLetter]]:
        """What may be sent before the write-ahead entry: replays repeat it exactly."""
        return ([r for r in self.records if r.kind == "p"],
                [d for d in self.dead_letters if not d.stateful])

    def outbox(self) -> tuple[list[ModelRecord], list[DeadLetter]]:
        """What is sent only once the write-ahead entry is stored."""
        return ([r for r in self.records if r.kind != "p"],
                [d for d in self.dead_letters if d.stateful])


@dataclass(slots=True)
class _Meta:
    offsets: dict[str, int] = field(default_factory=dict)
    watermarks: dict[str, float] = field(default_factory=dict)  # source -> newest ts
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    batches: int = 0  # batches drained; positions the next batch's o records

    def encode(self) -> bytes:
        return orjson.dumps({"o": self.offsets, "w": self.watermarks, "c": self.counts,
                             "s": self.batches})

    @classmethod
    def decode(cls, raw: bytes) -> _Meta:
        try:
            doc = orjson.loads(raw)
            return cls(doc["o"], doc["w"], doc["c"], doc.get("s", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise StateError(f"join meta entry is unreadable: {exc}") from exc


def _encode_wal(batch: int, writes: dict[str, bytes | None], records: list[ModelRecord],
                dead: list[DeadLetter]) -> bytes:
    # Keys and dead-letter bytes travel as latin-1 text: any bytes round-trip.
    return orjson.dumps({
        "s": batch,
        "w": {k: None if v is None else v.decode() for k, v in writes.items()},
        "r": [[r.kind, r.model, r.version, r.source, *r.position, r.item] for r in records],
        "d": [[d.topic, d.partition, d.offset, d.reason,
               None if d.raw is None else d.raw.decode("latin-1"),
               _key_text(d.key)] for d in dead],
    })


def _decode_wal(raw: bytes) -> tuple[int, Flush]:
    try:
        doc = orjson.loads(raw)
        writes = {k: None if v is None else v.encode() for k, v in doc["w"].items()}
        records = [ModelRecord(kind, model, version, source, (offset, sub), item)
                   for kind, model, version, source, offset, sub, item in doc["r"]]
        dead = [DeadLetter(topic, partition, offset, reason,
                           None if raw is None else raw.encode("latin-1"),
                           _text_key(key), stateful=True)
                for topic, partition, offset, reason, raw, key in doc["d"]]
        return int(doc["s"]), Flush(records, dead, writes, None)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StateError(f"join write-ahead entry is unreadable: {exc}") from exc


class JoinPartition:
    """Join state of one partition.

    Parameters
    ----------
    store
        Mapping shared by all partitions (the worker's table); str keys, bytes values.
    partition
        The input partition this object owns.
    ttl
        Seconds of event time an unmatched entry is kept.
    duplicate_window
        Seconds of event time a matched id is kept, to spot a duplicate (at most ``ttl``;
        by default ``ttl``).
    limits
        Event size bounds.
    regression
        Whether a model is a regression (its predictions and labels must be numbers).
    max_versions
        Most distinct model versions this partition follows; predictions of further ones
        are dead-lettered as ``too_many_models`` (a flood of names must not grow state).
    heaps
        This partition's part of :func:`expiry_heaps`, when the caller opens several
        partitions over one store; by default the store is read for it.

    Attributes
    ----------
    records
        ModelRecords produced since the last :meth:`drain`.
    dead_letters
        DeadLetters produced since the last :meth:`drain`.
    changed
        Entries changed since the last :meth:`drain`: key -> value (None: deleted); the
        meta entry's key marks that it changed, and is encoded at the drain.
    skipped
        Replayed events skipped because their offset was already absorbed.
    held
        Bytes of input absorbed (and dead letters made) since the last :meth:`drain`:
        callers drain early when it grows, to keep the write-ahead entry small.
    recovered
        A Flush of the outbox and changed keys of a batch the worker died sending, when
        the store held one (module docstring); the caller sends it, then sets None.
    """

    def __init__(
        self,
        store: MutableMapping[str, bytes],
        partition: int,
        ttl: float,
        limits: Limits = DEFAULT_LIMITS,
        regression: Callable[[str], bool] = lambda model: False,
        max_versions: int = 1000,
        heaps: dict[str, list[tuple[float, str]]] | None = None,
        duplicate_window: float | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if duplicate_window is not None and not 0 < duplicate_window <= ttl:
            raise ValueError(f"duplicate_window must be in (0, ttl = {ttl}], "
                             f"got {duplicate_window}")
        self.store = store
        self.partition = partition
        self.ttl = ttl
        self._keep = {"P": ttl, "L": ttl, "D": ttl if duplicate_window is None
                      else duplicate_window}
        self.limits = limits
        self.regression = regression
        self._numeric: dict[str, bool] = {}  # regression(model), asked once per model
        self._sources = ("p" + str(partition), "o" + str(partition))  # of its records
        self._meta_key = meta_key(partition)
        self.max_versions = max_versions
        self.records: list[ModelRecord] = []
        self.dead_letters: list[DeadLetter] = []
        # Values kept as they are written, not looked up at the drain: by then the store's
        # slots for a batch's keys are out of the processor's caches.
        self.changed: dict[str, bytes | None] = {}
        self.skipped = 0
        self.held = 0
        self._outcomes = 0  # o records made in the current batch
        raw_meta = store.get(meta_key(partition))
        self._meta = _Meta.decode(raw_meta) if raw_meta is not None else _Meta()
        self.recovered: Flush | None = None
        # One heap per entry kind, (ts, id); items whose entry changed are skipped on pop.
        # A prediction matched by its label keeps its item: its marker has the same ts, and
        # the P heap hands the item to the marker's rule when it comes due (expire). That
        # saves the marker's own item for the TTL (150 of 388 heap bytes per matched id),
        # where a marker is kept at least as long as a prediction, so never due later.
        self._carry = self._keep["D"] >= self._keep["P"]
        self._heaps = {"P": [], "L": [], "D": [], **(
            heaps if heaps is not None else expiry_heaps(store, {partition}).get(partition, {}))}
        raw_wal = store.get(wal_key(partition))
        if raw_wal is not None:
            batch, flush = _decode_wal(raw_wal)
            if batch > self._meta.batches:  # the worker died before the batch was stored
                for key, value in flush.writes.items():
                    if value is None:
                        store.pop(key, None)
                        continue
                    store[key] = value
                    if not key.startswith("\x00"):
                        entry = orjson.loads(value)
                        heapq.heappush(self._heaps[entry[0]], (entry[1], key))
                self._meta = _Meta.decode(store[meta_key(partition)])
                self.recovered = flush

    # -- public surface ---------------------------------------------------------------

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Durable counters: ``{counter: {label: n}}`` (labels like ``"model|version"``)."""
        return self._meta.counts

    def watermark(self, source: str) -> float:
        """Newest event time seen on this partition of ``source`` (``"p"`` or ``"l"``)."""
        return self._meta.watermarks.get(source, _NEVER)

    def absorb(
        self, topic: str, raw: bytes | None, offset: int, kafka_ts: float, key: bytes | None = None
    ) -> None:
        """Take one input event (``topic`` is ``"predictions"`` or ``"labels"``)."""
        if self._absorb(_SOURCE_CODE[topic], topic, raw, offset, kafka_ts, key):
            self.changed[self._meta_key] = None

    def absorb_many(self, topic: str, records: Iterable[InputRecord],
                    budget: float = float("inf")) -> int:
        """Take input records of ``topic`` in offset order, as :meth:`absorb` one each,
        until :attr:`held` reaches ``budget`` bytes; return how many were taken.

        >>> part = JoinPartition({}, partition=0, ttl=60.0)
        >>> labels = [InputRecord(offset, 1000, None, b'{"id": "%d", "label": 1}' % offset)
        ...           for offset in (7, 8, 9)]
        >>> part.absorb_many("labels", labels, budget=40), part.held
        (2, 46)
        >>> part.absorb_many("labels", labels[2:]), part.expected("labels")
        (1, 10)
        """
        source = _SOURCE_CODE[topic]
        absorb = self._absorb
        taken = changed = 0
        for rec in records:
            changed |= absorb(source, topic, rec.value, rec.offset, rec.timestamp / 1000.0,
                              rec.key)
            taken += 1
            if self.held >= budget:
                break
        if changed:
            self.changed[self._meta_key] = None  # encoded once per drain, not per event
        return taken

    def expire(self, budget: float = float("inf")) -> None:
        """Remove entries their partner can no longer join; count or dead-letter them.

        Stops once :attr:`held` reaches ``budget`` bytes; the rest expire next time.
        """
        wm_p, wm_l = self.watermark("p"), self.watermark("l")
        cutoffs = {"P": wm_l, "L": wm_p, "D": min(wm_p, wm_l)}
        marker_cutoff = cutoffs["D"] - self._keep["D"]
        for kind, heap in self._heaps.items():
            cutoff = cutoffs[kind] - self._keep[kind]
            while heap and heap[0][0] < cutoff and self.held < budget:
                ts, event_id = heapq.heappop(heap)
                raw = self.store.get(event_id)
                if raw is None:
                    continue
                entry = orjson.loads(raw)
                # A matched prediction's item, which its marker carries.
                carried = self._carry and kind == "P" and entry[0] == "D"
                if entry[1] != ts or (entry[0] != kind and not carried):
                    continue  # superseded heap item
                if carried and ts >= marker_cutoff:  # not due yet: it waits with the markers
                    heapq.heappush(self._heaps["D"], (ts, event_id))
                    continue
                self._delete(event_id)
                if entry[0] == "P":
                    self._count("expired", count_key(entry[3], entry[4]))
                elif entry[0] == "L":
                    for cand in _candidates(entry):
                        raw_label = cand[4].encode()
                        self.held += len(raw_label)
                        self._dead(LABELS, cand[3], "unmatched_label", raw_label,
                                   _label_key(cand, event_id))
                self.changed[self._meta_key] = None

    def expected(self, topic: str) -> int | None:
        """The offset of ``topic`` (``"predictions"`` or ``"labels"``) this partition
        absorbs next if none is missing; None before its first event.

        >>> part = JoinPartition({}, partition=0, ttl=60.0)
        >>> part.absorb("labels", b'{"id": "a", "label": 1}', offset=41, kafka_ts=1.0)
        >>> part.expected("labels"), part.expected("predictions")
        (42, None)
        """
        last = self._meta.offsets.get(_SOURCE_CODE[topic])
        return None if last is None else last + 1

    def pending(self) -> int:
        """Predictions waiting for their label."""
        return _pending(self._meta.counts)

    @staticmethod
    def peek(store: MutableMapping[str, bytes], partition: int) -> tuple[dict[str, Any], int]:
        """Counts and pending predictions of a partition's state, without loading it."""
        raw = store.get(meta_key(partition))
        counts = _Meta.decode(raw).counts if raw is not None else {}
        return counts, _pending(counts)

    def drain(self) -> Flush:
        """Hand over records, dead letters, changed entries and the write-ahead entry."""
        if not self.changed:
            return Flush([], [], {}, None)
        self._meta.batches += 1
        records, dead, writes = self.records, self.dead_letters, self.changed
        # The meta entry goes last: once it is stored, so is everything before it, and
        # the write-ahead entry of its batch is spent.
        meta = self._meta_key
        writes.pop(meta, None)
        self.store[meta] = writes[meta] = self._meta.encode()
        flush = Flush(records, dead, writes, None)
        wal = _encode_wal(self._meta.batches, writes, *flush.outbox())
        self.store[wal_key(self.partition)] = wal
        self.records, self.dead_letters, self.changed = [], [], {}
        self.held = self._outcomes = 0
        return flush._replace(wal=wal)

    # -- internals ----------------------------------------------------------------------

    def _absorb(self, source: str, topic: str, raw: bytes | None, offset: int,
                kafka_ts: float, key: bytes | None) -> bool:
        """One input event; False when it is a replay (skipped)."""
        offsets = self._meta.offsets
        if offset <= offsets.get(source, -1):
            self.skipped += 1
            return False
        value, raw = raw, raw or b""  # a null value reads as empty, and is dead-lettered null
        self.held += len(raw)
        event: Prediction | Label | None
        try:
            # The msgspec decoders take well-formed events; the rest get the full
            # validator, which names the reason (models.schema).
            if source == "p":
                event = (schema.prediction(raw, kafka_ts, self.limits)
                         or parse_prediction(raw, kafka_ts, self.limits))
            else:
                event = (schema.label(raw, kafka_ts, self.limits)
                         or parse_label(raw, kafka_ts, self.limits))
        except InvalidEvent as exc:
            self._dead(topic, offset, exc.reason, value, key, stateful=False)
            event = None
        if event is not None:
            # The watermark of the event's side; an event dead-lettered below (a
            # duplicate, a mismatch) was still seen.
            watermarks = self._meta.watermarks
            if event.ts > watermarks.get(source, _NEVER):
                watermarks[source] = event.ts
            try:
                if source == "p":
                    self._prediction(event, offset, raw)  # type: ignore[arg-type]
                else:
                    self._label(event, offset, raw, key)  # type: ignore[arg-type]
            except InvalidEvent as exc:
                self._dead(topic, offset, exc.reason, raw, key)
        offsets[source] = offset
        return True

    def _numeric_model(self, model: str) -> bool:
        numeric = self._numeric.get(model)
        if numeric is None:
            numeric = self.regression(model)
            if len(self._numeric) < self.max_versions:  # a flood of names grows nothing
                self._numeric[model] = numeric
        return numeric

    def _prediction(self, p: Prediction, offset: int, raw: bytes) -> None:
        existing = self.store.get(p.id)
        label_first = None
        if existing is not None:
            entry = orjson.loads(existing)
            if entry[0] != "L":
                raise InvalidEvent("duplicate_prediction", f"prediction id {p.id!r} seen before")
            label_first = entry
        numeric = self._numeric_model(p.model)
        if numeric and not regression_number(p.prediction):
            raise InvalidEvent("invalid_prediction", f"field 'prediction' must be a number "
                               f"within ±1e153: {p.model!r} is a regression")
        mv = count_key(p.model, p.version)
        followed = self._meta.counts.get("predictions", {})
        if mv not in followed and len(followed) >= self.max_versions:
            raise InvalidEvent("too_many_models",
                               f"field 'model': partition {self.partition} already follows "
                               f"{self.max_versions} model versions")
        self._count("predictions", mv)
        confidence = p.confidence
        self.records.append(
            ModelRecord("p", p.model, p.version, self._sources[0], (offset, 0),
                        [p.ts, p.features, p.prediction, confidence], raw)
        )
        if label_first is not None:
            # The first label that fits wins; those naming another model (or, for a
            # regression, no number) are dead-lettered, later fitting ones are duplicates.
            winner = None
            for cand in _candidates(label_first):
                l_ts, label, l_model, l_offset, l_raw = cand[:5]
                bad = ("model_mismatch" if l_model is not None and l_model != p.model
                       else "invalid_label" if numeric and not regression_number(label)
                       else "duplicate_label" if winner is not None else None)
                if bad is None:
                    winner = (l_ts, label)
                    continue
                self._count("dead", f"labels|{bad}")
                self.dead_letters.append(
                    DeadLetter(LABELS, self.partition, l_offset, bad, l_raw.encode(),
                               _label_key(cand, p.id), stateful=True)
                )
            if winner is not None:
                l_ts, label = winner
                self._match(p.id, p.model, p.version, p.prediction, p.scores, p.ts,
                            label, l_ts, min(p.ts, l_ts))
                return
        self._put(p.id, ["P", p.ts, self.partition, p.model, p.version, p.prediction, p.scores])

    def _label(self, lab: Label, offset: int, raw: bytes, key: bytes | None = None) -> None:
        existing = self.store.get(lab.id)
        if existing is None:
            entry = ["L", lab.ts, self.partition, lab.label, lab.model, offset, raw.decode()]
            kept = _kept_key(key, lab.id)
            self._put(lab.id, [*entry, [], *kept] if kept else entry)
            return
        entry = orjson.loads(existing)
        if entry[0] == "L" and entry[4] is not None:
            # The first label named a model: keep this one too until the prediction comes.
            later = entry[7] if len(entry) > 7 else []
            if (len(later) + 1 >= MAX_WAITING_LABELS
                    or len(existing) + len(raw) > MAX_WAITING_BYTES):
                raise InvalidEvent("duplicate_label",
                                   f"label id {lab.id!r} has {len(later) + 1} labels waiting "
                                   f"for its prediction already")
            entry = [*entry[:7], [*later, [lab.ts, lab.label, lab.model, offset, raw.decode(),
                                           *_kept_key(key, lab.id)]], *entry[8:]]
            self.store[lab.id] = self.changed[lab.id] = _entry_bytes(entry)
            return
        if entry[0] != "P":
            raise InvalidEvent("duplicate_label", f"label for id {lab.id!r} seen before")
        _, p_ts, _, model, version, prediction, scores = entry
        if lab.model is not None and lab.model != model:
            raise InvalidEvent("model_mismatch", f"label names model {lab.model!r}, not {model!r}")
        if self._numeric_model(model) and not regression_number(lab.label):
            raise InvalidEvent("invalid_label", f"field 'label' must be a number within "
                               f"±1e153: {model!r} is a regression")
        self._match(lab.id, model, version, prediction, scores, p_ts, lab.label, lab.ts, p_ts,
                    carried=self._carry)

    def _match(self, event_id: str, model: str, version: str, prediction: Any,
               scores: dict[str, float] | None, p_ts: float, label: Any, l_ts: float,
               entry_ts: float, carried: bool = False) -> None:
        """Pair a prediction with its label: an ``o`` record, and the id's marker (whose
        expiry item the prediction's heap holds already when ``carried``)."""
        mv = count_key(model, version)
        self._count("matched", mv)
        p_label = None
        confidence = None
        if scores:
            confidence = max(scores.values())
            p_label = scores.get(class_key(label), 0.0)
        delay = l_ts - p_ts
        # Positioned by batch, not by the event that completed the pair: a replay may
        # pair them the other way round (module docstring).
        self.records.append(
            ModelRecord("o", model, version, self._sources[1],
                        (self._meta.batches + 1, self._outcomes),
                        [l_ts if delay > 0.0 else p_ts, prediction, label, p_label, confidence,
                         delay if delay > 0.0 else 0.0])
        )
        self._outcomes += 1
        self._put(event_id, ["D", entry_ts, self.partition], push=not carried)

    def _dead(self, topic: str, offset: int, reason: str, raw: bytes | None, key: bytes | None,
              stateful: bool = True) -> None:
        self._count("dead", f"{topic}|{reason}")
        self.dead_letters.append(
            DeadLetter(topic, self.partition, offset, reason, raw, key, stateful))

    def _count(self, counter: str, label: str) -> None:
        bucket = self._meta.counts.setdefault(counter, {})
        bucket[label] = bucket.get(label, 0) + 1

    def _put(self, event_id: str, entry: list[Any], push: bool = True) -> None:
        if push:
            heapq.heappush(self._heaps[entry[0]], (entry[1], event_id))
        self.store[event_id] = self.changed[event_id] = _entry_bytes(entry)

    def _delete(self, event_id: str) -> None:
        del self.store[event_id]
        self.changed[event_id] = None




def expiry_heaps(store: MutableMapping[str, bytes],
                 partitions: Collection[int]) -> dict[int, dict[str, list[tuple[float, str]]]]:
    """The expiry heaps of the entries of ``partitions``, in one pass over the store.

    The store is shared by every partition a worker owns: opening each partition with a
    pass of its own would decode every entry once per partition (after a rebalance, 8
    partitions over 400,000 pending entries took 1.37 s). A partition without entries is
    absent from the result.

    >>> store = {}
    >>> for p in (0, 1):
    ...     part = JoinPartition(store, partition=p, ttl=60.0)
    ...     part.absorb("labels", b'{"id": "%d", "label": 1, "ts": 5}' % p, offset=0, kafka_ts=5.0)
    >>> expiry_heaps(store, {1, 2})
    {1: {'P': [], 'L': [(5.0, '1')], 'D': []}}
    """
    wanted = set(partitions)
    heaps: dict[int, dict[str, list[tuple[float, str]]]] = {}
    for key, raw in store.items():
        if key.startswith("\x00") or raw is None:
            continue
        entry = orjson.loads(raw)
        if entry[2] in wanted:
            of = heaps.get(entry[2])
            if of is None:
                of = heaps[entry[2]] = {"P": [], "L": [], "D": []}
            of[entry[0]].append((entry[1], key))
    for of in heaps.values():
        for heap in of.values():
            heapq.heapify(heap)
    return heaps


def _entry_bytes(entry: list[Any]) -> bytes:
    """An entry encoded for the store, in a bytes object of its own size.

    ``orjson.dumps`` returns its output in a 4 KiB allocation whatever the length; kept in
    the store that is 4 KiB of memory per pending prediction instead of about 100 bytes.
    The copy is cheap (~0.1 us).

    >>> _entry_bytes(["D", 1.0, 0])
    b'["D",1.0,0]'
    """
    return memoryview(orjson.dumps(entry)).tobytes()


def count_key(model: str, version: str) -> str:
    r"""The key a model version is counted under in a partition's counts:
    ``model|version``, as earlier releases stored it, for a model name without ``|``; for
    one with it (where the bar would not say where the name ends), ``\x1e`` and the pair
    as JSON, which :func:`split_count_key` reads back.

    >>> count_key("fraud", "3"), count_key("C:\\models", "v|1")
    ('fraud|3', 'C:\\models|v|1')
    >>> count_key("a|b", "1")
    '\x1e["a|b","1"]'
    >>> [split_count_key(count_key(m, "v|1")) for m in ("a|b", "C:\\models")]
    [('a|b', 'v|1'), ('C:\\models', 'v|1')]
    """
    if "|" in model:
        return "\x1e" + orjson.dumps([model, version]).decode()
    return f"{model}|{version}"


def split_count_key(key: str) -> tuple[str, str]:
    """(model, version) of a :func:`count_key` key."""
    if key.startswith("\x1e"):
        model, version = orjson.loads(key[1:])
        return model, version
    model, _, version = key.partition("|")
    return model, version


def _pending(counts: dict[str, dict[str, int]]) -> int:
    return sum(counts.get("predictions", {}).values()) - sum(
        counts.get("matched", {}).values()
    ) - sum(counts.get("expired", {}).values())


def _candidates(entry: list[Any]) -> list[list[Any]]:
    """The labels an ``L`` entry holds, first first: ``[ts, label, model, offset, raw]``,
    and the label's key when it was not its id."""
    _, ts, _, label, model, offset, raw, *rest = entry
    return [[ts, label, model, offset, raw, *rest[1:]], *(rest[0] if rest else [])]


def _kept_key(key: bytes | None, event_id: str) -> list[str | None]:
    """What a waiting label's entry keeps of its Kafka key: nothing when it is the id's
    bytes, else the key as a Latin-1 string (any bytes round-trip), or None for no key."""
    if key == event_id.encode():
        return []
    return [_key_text(key)]


def _label_key(candidate: list[Any], event_id: str) -> bytes | None:
    r"""The Kafka key a waiting label came with: its id's bytes unless it kept another.

    >>> _label_key([1.0, 1, None, 7, "{}"], "a"), _label_key([1.0, 1, None, 7, "{}", None], "a")
    (b'a', None)
    >>> _label_key([1.0, 1, None, 7, "{}", "\xff\x00k"], "a")
    b'\xff\x00k'
    """
    if len(candidate) < 6:
        return event_id.encode()
    return _text_key(candidate[5])


def _key_text(key: bytes | None) -> str | None:
    r"""A Kafka key as JSON-safe text: Latin-1, so any bytes round-trip; None stays None.

    >>> _key_text(b"\xfe\xff-k"), _text_key(_key_text(b"\xfe\xff-k")), _key_text(None)
    ('\xfe\xff-k', b'\xfe\xff-k', None)
    """
    return None if key is None else key.decode("latin-1")


def _text_key(text: str | None) -> bytes | None:
    """The Kafka key ``_key_text`` made the text of."""
    return None if text is None else text.encode("latin-1")
