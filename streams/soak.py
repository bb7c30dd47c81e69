"""``python -m streams soak``: is a worker's memory flat over a long run at a steady rate?

Against the broker in ``DRIFTWARDEN_BROKER``, on fresh topics of its own, one
``python -m streams worker`` is fed the bench's 20-feature predictions and labels at
``--rate`` events/s, in event time that follows the clock, for ``--minutes``. A fraction
of the predictions (``--unlabelled``) never gets a label, and the label TTL is short
(``--ttl`` seconds), so the join's expiry is part of what is measured: without it the
buffer would grow with every unlabelled prediction.

Every ``--sample-seconds`` the worker's RSS (VmRSS) is read, and its
``driftwarden_pending_labels`` (the join buffer: it should stay level too). After
``--warmup-minutes`` (the join buffer fills to its steady size: one TTL of entries) the
samples are split in halves. Memory is **flat** when the second half has no upward
trend: its least-squares slope is at most ``--max-trend`` of its median per 10 minutes.
A leak is a trend; what the verdict does not count is a one-time step, and there is one
whenever prediction ids and offsets gain a decimal digit: every new key and join entry
then falls in a larger size class of CPython's small-object allocator, the old class's
pools drain over one label TTL, and the arenas that held them stay pinned by
longer-lived neighbours (at the millionth prediction: +14 arenas of 1 MiB for +2.9 MB of
live data; the next such step is ten times as many events later). So the growth from
the first half to the second is reported beside the verdict, not hidden by it; the
default half hour at 3,000 events/s puts the 10**5 offset and 10**6 id steps in the
first half. Also reported: the peak, and whether the worker kept up (all outcomes
absorbed within a minute of the last event). Exit status 1 when memory is not flat or
the worker fell behind. Run it on an otherwise idle machine: a worker that falls behind
for a while buffers more, and the allocator keeps that high-water mark. The half-hour
default is not part of ``make test`` (a 45-second run is).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from dataclasses import replace
from typing import Any

import orjson

from streams.bench_e2e import WorkerProcess, print_table, produce, stream, wait_until
from streams.settings import Settings
from streams.topics import TopicNames, ensure_topics

__all__ = ["add_parser", "soak"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("soak", help="worker RSS over a long run at a steady rate")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=3000.0, help="events/s (both topics)")
    p.add_argument("--unlabelled", type=float, default=0.05,
                   help="fraction of predictions never labelled")
    p.add_argument("--ttl", type=float, default=60.0, help="DRIFTWARDEN_LABEL_TTL_SECONDS")
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=3.0)
    p.add_argument("--max-trend", type=float, default=0.01,
                   help="largest second-half slope, as a fraction of its median per 10 min")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    p.set_defaults(func=soak)


async def _run(settings: Settings, a: argparse.Namespace, worker: WorkerProcess,
               samples: list[tuple[float, int, float]]) -> tuple[int, int, float]:
    """Feed the worker for ``a.minutes`` while sampling its RSS; return (events sent,
    labels sent, seconds it took)."""
    names = TopicNames.from_settings(settings)
    # Each prediction brings (1 - unlabelled) labels on average.
    predictions_per_second = a.rate / (2.0 - a.unlabelled)
    n = int(predictions_per_second * a.minutes * 60)
    records = stream(names, n, seed=11, start_ts=time.time(), rate=predictions_per_second,
                     unlabelled=a.unlabelled)
    events = labels = 0

    def counted() -> Any:
        nonlocal events, labels
        for record in records:
            events += 1
            labels += record[0] == names.labels
            yield record

    started = time.monotonic()

    async def sample() -> None:
        while True:
            pending = await asyncio.to_thread(worker.sample, "driftwarden_pending_labels")
            samples.append((time.monotonic() - started, worker.rss(), pending))
            await asyncio.sleep(a.sample_seconds)

    sampling = asyncio.create_task(sample())
    try:
        await produce(settings, counted(), rate=a.rate)
    finally:
        sampling.cancel()
    return events, labels, time.monotonic() - started


def _slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) samples, in bytes per second."""
    import numpy as np

    return float(np.polyfit([t for t, _ in samples], [rss for _, rss in samples], 1)[0])


def soak(a: argparse.Namespace) -> int:
    base = Settings.from_env()
    settings = replace(base, topic_prefix=f"{base.topic_prefix}soak-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(settings))
    print(f"soak: {a.rate:,.0f} events/s for {a.minutes:g} min, {a.unlabelled:.0%} never "
          f"labelled, label TTL {a.ttl:g} s, topics {settings.topic_prefix}*", flush=True)
    worker = WorkerProcess(settings, "soak", DRIFTWARDEN_LABEL_TTL_SECONDS=str(a.ttl))
    samples: list[tuple[float, int, float]] = []
    try:
        asyncio.run(worker.settled())
        events, labels, seconds = asyncio.run(_run(settings, a, worker, samples))
        try:
            wait_until(lambda: worker.sample("driftwarden_outcomes_total") >= labels, 60,
                       f"{labels} outcomes")
            kept_up = True
        except RuntimeError:
            kept_up = False
        outcomes = int(worker.sample("driftwarden_outcomes_total"))
        peak = worker.peak_rss()
    finally:
        worker.stop()

    after = [s for s in samples if s[0] >= a.warmup_minutes * 60]
    steady = [(t, rss) for t, rss, _ in after]
    pending = [p for _, _, p in after]
    if len(steady) < 4:
        raise SystemExit("soak: too few samples after the warm-up; run longer")
    half = len(steady) // 2
    first = statistics.median(rss for _, rss in steady[:half])
    second = statistics.median(rss for _, rss in steady[half:])
    growth = second / first - 1.0
    slope, late_slope = _slope(steady), _slope(steady[half:])
    trend = late_slope * 600 / second
    flat = trend <= a.max_trend
    mib = 2**20
    rows = [
        ("events/s, as produced", f"{events / seconds:,.0f}"),
        ("minutes", f"{seconds / 60:,.1f}"),
        ("outcomes absorbed / labels sent", f"{outcomes:,} / {labels:,}"),
        ("RSS median, first half after warm-up", f"{first / mib:,.1f} MiB"),
        ("RSS median, second half", f"{second / mib:,.1f} MiB"),
        ("growth (second / first - 1)", f"{growth:+.2%}"),
        ("slope, least squares, all after warm-up", f"{slope * 600 / mib:+,.2f} MiB / 10 min"),
        ("slope, second half (the verdict's trend)",
         f"{late_slope * 600 / mib:+,.2f} MiB / 10 min"),
        ("trend: that slope / second-half median", f"{trend:+.2%} / 10 min"),
        ("peak RSS (VmHWM)", f"{peak / mib:,.1f} MiB"),
        ("predictions awaiting a label, min / max", f"{min(pending):,.0f} / {max(pending):,.0f}"),
        ("verdict", ("flat" if flat else "GROWING") + ("" if kept_up else ", FELL BEHIND")),
    ]
    print_table(rows, 20)
    if a.json:
        print(orjson.dumps({
            "rate_events_per_second": events / seconds, "seconds": seconds, "ttl_seconds": a.ttl,
            "unlabelled": a.unlabelled, "labels_sent": labels, "outcomes": outcomes,
            "kept_up": kept_up, "rss_first_half_bytes": first, "rss_second_half_bytes": second,
            "growth": growth, "slope_bytes_per_second": slope,
            "late_slope_bytes_per_second": late_slope, "trend_per_10_minutes": trend,
            "peak_rss_bytes": peak,
            "flat": flat, "pending_min": min(pending), "pending_max": max(pending),
            "samples": samples,
        }).decode())
    return 0 if flat and kept_up else 1
