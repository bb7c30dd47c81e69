"""``python -m streams bench drift``: the per-event cost of data-drift monitoring.

(``python -m streams bench`` alone runs the end-to-end harness, :mod:`streams.bench_e2e`.)

In-process and seeded: a reference profile of the simulated 20-feature traffic
(:func:`models.simulation.simulate_wide`), then the same prediction stream through a
:class:`models.datadrift.DataDriftMonitor` several times. Reports medians of the runs:
the cost per event with the default 2,000-event windows, the histogram update alone
(no window ever closes), and the evaluation of one window (all statistics, 20 features);
the first two both with one ``add_prediction`` call per event and with
``add_predictions`` a batch at a time, as the worker's model stage feeds it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import orjson

from models.datadrift import DataDriftMonitor, DriftConfig
from models.reference import build_profile
from models.simulation import WideScenario, simulate_wide

__all__ = ["add_parser", "bench_drift"]


def add_parser(sub: Any) -> None:
    from streams import bench_compare, bench_e2e

    parser = sub.add_parser("bench", help="end-to-end benchmark (or: bench drift)")
    bench_e2e.add_arguments(parser)
    parser.set_defaults(func=bench_e2e.bench)
    bench = parser.add_subparsers()
    drift = bench.add_parser("drift", help="per-event cost of data-drift monitoring")
    drift.add_argument("--events", type=bench_e2e.at_least(1), default=100_000,
                       help="predictions to profile")
    drift.add_argument("--numeric", type=bench_e2e.at_least(0), default=16, help="numeric features")
    drift.add_argument("--categorical", type=bench_e2e.at_least(0), default=4,
                       help="categorical features")
    drift.add_argument("--window", type=bench_e2e.at_least(2), default=2000,
                       help="drift window, predictions")
    drift.add_argument("--repeat", type=bench_e2e.at_least(1), default=5, help="runs; medians")
    drift.add_argument("--batch", type=bench_e2e.at_least(1), default=1000,
                       help="predictions per add_predictions call (the bulk path)")
    drift.add_argument("--json", action="store_true", help="also print one JSON line")
    drift.set_defaults(func=bench_drift)
    bench_compare.add_parser(bench)


def _run(events: list[tuple[float, dict[str, Any], Any]], config: DriftConfig,
         reference: Any, batch: int = 0) -> tuple[float, int]:
    """Seconds to feed ``events`` one call each (``batch`` 0) or ``batch`` at a time."""
    monitor = DataDriftMonitor(config, reference=reference)
    if batch:
        columns = [list(column) for column in zip(*events, strict=True)]
        started = time.perf_counter()
        for i in range(0, len(events), batch):
            monitor.add_predictions(*(column[i:i + batch] for column in columns))
        return time.perf_counter() - started, monitor.windows
    add = monitor.add_prediction
    started = time.perf_counter()
    for ts, features, prediction in events:
        add(ts, features, prediction)
    return time.perf_counter() - started, monitor.windows


def bench_drift(a: argparse.Namespace) -> int:
    import pandas as pd

    scenario = WideScenario(n=10_000 + a.events, numeric=a.numeric, categorical=a.categorical,
                            seed=1)
    rows = [(ev.ts, ev.value["features"], str(ev.value["prediction"]))
            for ev in simulate_wide(scenario)]
    frame = pd.DataFrame([{**f, "prediction": p} for _, f, p in rows[:10_000]])
    reference = build_profile(frame, "bench", "1", prediction="prediction")
    events = rows[10_000:]
    windowed = DriftConfig(window=a.window, window_seconds=float("inf"))
    endless = DriftConfig(window=len(events) + 1, window_seconds=float("inf"))
    totals, updates, bulk_totals, bulk_updates, windows = [], [], [], [], 0
    for _ in range(a.repeat):
        seconds, windows = _run(events, windowed, reference)
        totals.append(seconds)
        updates.append(_run(events, endless, reference)[0])
        bulk_totals.append(_run(events, windowed, reference, a.batch)[0])
        bulk_updates.append(_run(events, endless, reference, a.batch)[0])
    per_event, per_update, bulk_event, bulk_update = (
        statistics.median(runs) / len(events)
        for runs in (totals, updates, bulk_totals, bulk_updates))
    per_window = (statistics.median(totals) - statistics.median(updates)) / max(windows, 1)
    features = a.numeric + a.categorical
    print(f"data-drift monitoring, {features} features ({a.numeric} numeric, "
          f"{a.categorical} categorical) + prediction, {len(events):,} events, "
          f"window {a.window:,}, median of {a.repeat} runs")
    print("                             one call per event   add_predictions, "
          f"{a.batch:,} at a time")
    print(f"  per event, all in          {per_event * 1e6:8.2f} us"
          f"          {bulk_event * 1e6:8.2f} us")
    print(f"  per event, histograms only {per_update * 1e6:8.2f} us"
          f"          {bulk_update * 1e6:8.2f} us")
    print(f"  per window evaluation      {per_window * 1e3:8.2f} ms  ({windows} windows)")
    if a.json:
        print(orjson.dumps({
            "features": features, "events": len(events), "window": a.window,
            "batch": a.batch, "per_event_seconds": per_event,
            "per_event_update_seconds": per_update, "per_window_seconds": per_window,
            "bulk_per_event_seconds": bulk_event, "bulk_per_event_update_seconds": bulk_update,
            "windows": windows,
            "runs": {"total_seconds": totals, "update_seconds": updates,
                     "bulk_total_seconds": bulk_totals, "bulk_update_seconds": bulk_updates},
        }).decode())
    return 0
