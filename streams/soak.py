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

``--split`` runs the two-process layout instead (``DRIFTWARDEN_ROLE=join`` and
``monitor``, README "One process or two"): each process's RSS is sampled and judged on
its own, and memory is flat when both are.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import orjson

from models.errors import ConfigError
from streams.bench_e2e import (
    WorkerProcess,
    at_least,
    fresh_topics,
    print_table,
    produce,
    start_split,
    stream,
    wait_until,
)
from streams.settings import Settings
from streams.topics import TopicNames

__all__ = ["add_parser", "soak"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("soak", help="worker RSS over a long run at a steady rate")
    p.add_argument("--minutes", type=at_least(0.1, float), default=30.0, help="length of the run")
    p.add_argument("--rate", type=at_least(10.0, float), default=3000.0,
                   help="events/s (both topics)")
    p.add_argument("--unlabelled", type=float, default=0.05,
                   help="fraction of predictions never labelled")
    p.add_argument("--ttl", type=at_least(1.0, float), default=60.0,
                   help="DRIFTWARDEN_LABEL_TTL_SECONDS")
    p.add_argument("--sample-seconds", type=at_least(1.0, float), default=10.0,
                   help="RSS sampling interval")
    p.add_argument("--warmup-minutes", type=at_least(0.0, float), default=3.0,
                   help="minutes left out of the trend")
    p.add_argument("--max-trend", type=float, default=0.01,
                   help="largest second-half slope, as a fraction of its median per 10 min")
    p.add_argument("--split", action="store_true",
                   help="the join and the model stage as two processes (DRIFTWARDEN_ROLE)")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    p.set_defaults(func=soak)


#: A sample: (seconds since the start, RSS of each process in bytes, pending labels).
Sample = tuple[float, list[int], float]


async def _run(settings: Settings, a: argparse.Namespace, workers: list[WorkerProcess],
               samples: list[Sample]) -> tuple[int, int, float]:
    """Feed the worker (the join first when split) for ``a.minutes`` while sampling the
    RSS of each process; return (events sent, labels sent, seconds it took)."""
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
            pending = await asyncio.to_thread(workers[0].sample, "driftwarden_pending_labels")
            samples.append((time.monotonic() - started, [w.rss() for w in workers], pending))
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


def _memory(steady: list[tuple[float, int]], max_trend: float) -> dict[str, Any]:
    """The verdict on one series of (seconds, RSS) samples after the warm-up: medians of
    its halves, its slopes, and whether the second half's trend is within ``max_trend``."""
    half = len(steady) // 2
    first = statistics.median(rss for _, rss in steady[:half])
    second = statistics.median(rss for _, rss in steady[half:])
    late_slope = _slope(steady[half:])
    trend = late_slope * 600 / second
    return {"rss_first_half_bytes": first, "rss_second_half_bytes": second,
            "growth": second / first - 1.0, "slope_bytes_per_second": _slope(steady),
            "late_slope_bytes_per_second": late_slope, "trend_per_10_minutes": trend,
            "flat": trend <= max_trend}


def soak(a: argparse.Namespace) -> int:
    if (a.minutes - a.warmup_minutes) * 60 < 4 * a.sample_seconds:
        raise ConfigError(  # checked before anything runs, not after the run
            f"--minutes {a.minutes:g} leaves fewer than 4 samples (--sample-seconds "
            f"{a.sample_seconds:g}) after --warmup-minutes {a.warmup_minutes:g}")
    settings, _ = fresh_topics("soak")
    roles = ("join", "monitor") if a.split else ("all",)
    layout = "join + model stage processes" if a.split else "one worker process"
    print(f"soak: {a.rate:,.0f} events/s for {a.minutes:g} min, {a.unlabelled:.0%} never "
          f"labelled, label TTL {a.ttl:g} s, {layout}, topics {settings.topic_prefix}*",
          flush=True)
    env = {"DRIFTWARDEN_LABEL_TTL_SECONDS": str(a.ttl)}
    started: list[WorkerProcess] = []
    samples: list[Sample] = []
    try:
        if a.split:  # in the order of roles: join, model stage
            workers = list(start_split(settings, "soak", started, **env))
        else:
            started.append(WorkerProcess(settings, "soak", DRIFTWARDEN_ROLE="all", **env))
            workers = started[:]
        asyncio.run(workers[0].settled())
        events, labels, seconds = asyncio.run(_run(settings, a, workers, samples))
        outcomes_of = workers[-1]  # the process that runs the model stage
        try:
            wait_until(lambda: outcomes_of.sample("driftwarden_outcomes_total") >= labels, 60,
                       f"{labels} outcomes")
            kept_up = True
        except RuntimeError:
            kept_up = False
        outcomes = int(outcomes_of.sample("driftwarden_outcomes_total"))
        peaks = [w.peak_rss() for w in workers]
    finally:
        for worker in started:
            worker.stop()

    after = [s for s in samples if s[0] >= a.warmup_minutes * 60]
    pending = [p for _, _, p in after]
    if len(after) < 4:
        raise SystemExit("soak: too few samples after the warm-up; run longer")
    # The deployment's RSS (one process, or both summed), and each process's: memory is
    # flat when every process's is.
    total = _memory([(t, sum(rss)) for t, rss, _ in after], a.max_trend)
    each = [_memory([(t, rss[i]) for t, rss, _ in after], a.max_trend)
            for i in range(len(roles))]
    flat = all(m["flat"] for m in each)
    mib = 2**20

    def per_process(fmt: str, values: list[float], unit: str = "") -> str:
        return " / ".join(format(v, fmt) for v in values) + unit

    def field(name: str, scale: float = 1.0) -> list[float]:
        return [m[name] * scale for m in each]

    rows = [
        ("events/s, as produced", f"{events / seconds:,.0f}"),
        ("minutes", f"{seconds / 60:,.1f}"),
        ("outcomes absorbed / labels sent", f"{outcomes:,} / {labels:,}"),
        *([("processes (figures below in this order)", "join / model stage")]
          if a.split else []),
        ("RSS median, first half after warm-up",
         per_process(",.1f", field("rss_first_half_bytes", 1 / mib), " MiB")),
        ("RSS median, second half",
         per_process(",.1f", field("rss_second_half_bytes", 1 / mib), " MiB")),
        ("growth (second / first - 1)", per_process("+.2%", field("growth"))),
        ("slope, least squares, all after warm-up",
         per_process("+,.2f", field("slope_bytes_per_second", 600 / mib), " MiB / 10 min")),
        ("slope, second half (the verdict's trend)",
         per_process("+,.2f", field("late_slope_bytes_per_second", 600 / mib),
                     " MiB / 10 min")),
        ("trend: that slope / second-half median",
         per_process("+.2%", field("trend_per_10_minutes"), " / 10 min")),
        ("peak RSS (VmHWM)", per_process(",.1f", [p / mib for p in peaks], " MiB")),
        ("predictions awaiting a label, min / max", f"{min(pending):,.0f} / {max(pending):,.0f}"),
        ("verdict", ("flat" if flat else "GROWING") + ("" if kept_up else ", FELL BEHIND")),
    ]
    print_table(rows, 20)
    if a.json:
        # Top level: the deployment's RSS (for one process, that process's); its peak is
        # the processes' peaks summed (an upper bound when there are two).
        print(orjson.dumps({
            "rate_events_per_second": events / seconds, "seconds": seconds, "ttl_seconds": a.ttl,
            "unlabelled": a.unlabelled, "labels_sent": labels, "outcomes": outcomes,
            "kept_up": kept_up, **{k: v for k, v in total.items() if k != "flat"},
            "peak_rss_bytes": sum(peaks),
            "flat": flat, "pending_min": min(pending), "pending_max": max(pending),
            "samples": [(t, sum(rss), p) for t, rss, p in samples],
            "processes": {role: {**m, "peak_rss_bytes": peak,
                                 "rss_samples": [rss[i] for _, rss, _ in samples]}
                          for i, (role, m, peak) in enumerate(zip(roles, each, peaks,
                                                                  strict=True))},
        }).decode())
    return 0 if flat and kept_up else 1
