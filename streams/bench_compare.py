"""``python -m streams bench compare BUILD BUILD ...``: builds taking turns over one input.

Identical worker runs on a shared 2-core machine differ by 15-20%, and runs an hour apart
by more (README, Performance), so two builds are not compared by two bench runs: workers
of each build take turns over one produced input, round after round, each with a fresh
consumer group, and each round compares like with like. A change is judged by the
medians and by how many rounds it was ahead in.

A BUILD is a git revision of this checkout (its ``streams/`` and ``models/``, extracted
once under ``.local/bench/builds/<commit>``) or ``.`` (this checkout's files as they are
now), optionally followed by environment for its workers: ``.:DRIFTWARDEN_BATCH_SIZE=24000``
or ``HEAD~1:DRIFTWARDEN_COMPRESSION=none,DRIFTWARDEN_BATCH_SIZE=1000``. A build's workers
run with its directory as their working directory, first on ``sys.path``: the installed
package (an editable install points at this checkout) cannot shadow it.

Per run: events/s from the first consumed event to the last absorbed outcome, the CPU
per event and the busy share of the main thread (the join's, with ``--layout two``), and
peak RSS. Prints each run as it ends, then a table; ``--json`` adds one JSON object on
the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from models.errors import ConfigError
from streams import bench_e2e
from streams.settings import Settings
from streams.topics import TopicNames, ensure_topics

__all__ = ["Build", "add_parser", "compare", "resolve"]

#: The checkout this module belongs to: ``.`` builds run it, revisions come from its git.
ROOT = Path(__file__).resolve().parents[1]
#: What a build is made of: the code a worker imports.
PACKAGES = ("streams", "models")


@dataclass(frozen=True)
class Build:
    """Code for workers to run, and environment for them.

    ``spec`` is the BUILD as given, ``commit`` the revision's (None for ``.``), ``path``
    the directory holding its packages.
    """

    spec: str
    commit: str | None
    path: Path
    env: dict[str, str]

    def worker_env(self) -> dict[str, str]:
        """Environment for a worker of this build, which runs in :attr:`path`: ``python
        -m`` puts the working directory first on ``sys.path``, ahead of ``PYTHONPATH``
        and of the installed package; ``PYTHONPATH`` names it too, for any other
        interpreter the worker starts."""
        return {**self.env, "PYTHONPATH": str(self.path)}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="builds taking turns over one input (A/B)")
    p.add_argument("builds", nargs="+", metavar="BUILD",
                   help="a git revision or '.' (this checkout), then optionally "
                        ":NAME=VALUE,... for its workers; two or more")
    p.add_argument("--events", type=int, default=100_000, help="predictions (each labelled)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each build")
    p.add_argument("--layout", choices=("one", "two"), default="one",
                   help="one worker process, or the join and model stage processes")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    p.set_defaults(func=compare)


def resolve(spec: str, root: Path = ROOT) -> Build:
    """The Build a BUILD argument names; raises ConfigError saying what is wrong with it.

    >>> b = resolve(".:DRIFTWARDEN_BATCH_SIZE=24000")
    >>> b.commit, b.path == ROOT, b.env
    (None, True, {'DRIFTWARDEN_BATCH_SIZE': '24000'})
    >>> resolve(".:BATCH")
    Traceback (most recent call last):
    ...
    models.errors.ConfigError: build '.:BATCH': 'BATCH' is not NAME=VALUE
    """
    rev, _, assignments = spec.partition(":")
    env: dict[str, str] = {}
    for item in filter(None, assignments.split(",")):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigError(f"build {spec!r}: {item!r} is not NAME=VALUE")
        env[name] = value
    if rev == ".":
        return Build(spec, None, root, env)
    if not rev:
        raise ConfigError(f"build {spec!r}: no revision (a git revision, or '.')")
    found = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet",
                            f"{rev}^{{commit}}"], capture_output=True, text=True)
    if found.returncode != 0:
        raise ConfigError(f"build {spec!r}: {rev!r} is not a commit of the git repository "
                          f"at {root}")
    commit = found.stdout.strip()
    return Build(spec, commit, _extract(root, commit), env)


def _extract(root: Path, commit: str) -> Path:
    """The packages of ``commit``, extracted once (into a temporary directory, renamed
    into place when complete, so an interrupted extraction is never taken for one)."""
    dest = root / ".local" / "bench" / "builds" / commit
    if dest.is_dir():
        return dest
    archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", commit,
                              *PACKAGES], capture_output=True)
    if archive.returncode != 0:
        raise ConfigError(f"build {commit[:12]}: git archive failed: "
                          f"{archive.stderr.decode(errors='replace').strip()}")
    partial = dest.with_name(f"{commit}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(partial, filter="data")
        else:  # Python < 3.11.4: no filters; the archive is this repository's own
            tar.extractall(partial)
    partial.rename(dest)
    return dest


def _run(settings: Settings, build: Build, layout: str, n: int,
         run: int) -> dict[str, Any]:
    cwd, env = str(build.path), build.worker_env()
    if layout == "one":
        rate, peak, _, cpu = bench_e2e.worker_run(settings, n, run, cwd=cwd, **env)
        return {"events_per_second": rate, "cpu": cpu, "peak_rss_bytes": peak}
    rate, cpus, peaks = bench_e2e.split_run(settings, n, run, cwd=cwd, **env)
    return {"events_per_second": rate, "cpu": cpus["join"], "monitor_cpu": cpus["monitor"],
            "peak_rss_bytes": peaks["join"] + peaks["monitor"]}


def compare(a: argparse.Namespace) -> int:
    if len(a.builds) < 2:
        raise ConfigError("compare needs two builds or more (e.g. HEAD .)")
    if a.rounds < 1 or a.events < 1:
        raise ConfigError("--rounds and --events must be positive")
    builds = [resolve(spec) for spec in a.builds]
    base = Settings.from_env()
    settings = replace(base, topic_prefix=f"{base.topic_prefix}compare-{uuid.uuid4().hex[:8]}.")
    partitions = asyncio.run(ensure_topics(settings))
    print(f"compare: {a.events:,} predictions + {a.events:,} labels, {partitions} partitions, "
          f"layout {a.layout}, {a.rounds} round(s) of {len(builds)} builds", flush=True)
    for build in builds:
        print(f"  {build.spec}: {build.commit or 'this checkout'} ({build.path})", flush=True)
    asyncio.run(bench_e2e.produce(settings, bench_e2e.bench_input(TopicNames.from_settings(
        settings), a.events)))
    runs: list[list[dict[str, Any]]] = [[] for _ in builds]
    for r in range(a.rounds):
        for i, build in enumerate(builds):
            try:
                run = _run(settings, build, a.layout, a.events, r * len(builds) + i)
            except RuntimeError as exc:  # a worker exited, or timed out: say whose
                print(f"compare: build {build.spec!r}, round {r + 1}: {exc}", file=sys.stderr)
                return 1
            runs[i].append(run)
            cpu = run["cpu"]
            print(f"  round {r + 1} {build.spec}: {run['events_per_second']:,.0f} events/s, "
                  f"main thread {cpu['main_thread_seconds_per_event'] * 1e6:.1f} us/event, "
                  f"{cpu['main_thread_busy']:.0%} busy, peak RSS "
                  f"{run['peak_rss_bytes'] / 2**20:,.0f} MiB", flush=True)
    results = [_summary(build, own, runs[0]) for build, own in zip(builds, runs, strict=True)]
    _print(results, a)
    if a.json:
        print(orjson.dumps({"events": 2 * a.events, "partitions": partitions,
                            "layout": a.layout, "rounds": a.rounds,
                            "builds": results}).decode())
    return 0


def _summary(build: Build, runs: list[dict[str, Any]],
             first: list[dict[str, Any]]) -> dict[str, Any]:
    """A build's runs, their medians, and the rounds it was ahead of the first build in."""
    rates = [run["events_per_second"] for run in runs]
    per_event = [run["cpu"]["main_thread_seconds_per_event"] for run in runs]
    busy = [run["cpu"]["main_thread_busy"] for run in runs]
    rss = [run["peak_rss_bytes"] for run in runs]
    return {
        "build": build.spec, "commit": build.commit, "env": build.env,
        "events_per_second": statistics.median(rates),
        "main_thread_seconds_per_event": statistics.median(per_event),
        "main_thread_busy": statistics.median(busy),
        "peak_rss_bytes": statistics.median(rss),
        "ahead_of_first": sum(r > f["events_per_second"] for r, f in
                              zip(rates, first, strict=True)),
        "runs": runs,
    }


def _print(results: list[dict[str, Any]], a: argparse.Namespace) -> None:
    first = results[0]["events_per_second"]
    thread = "main thread" if a.layout == "one" else "join's main thread"
    print(f"driftwarden compare, medians of {a.rounds} round(s), layout {a.layout}; "
          f"'ahead' counts the rounds a build beat {results[0]['build']} in")
    for result in results:
        print(f"  {result['build']}: {result['events_per_second']:,.0f} events/s "
              f"({result['events_per_second'] / first:.1%} of the first), {thread} "
              f"{result['main_thread_seconds_per_event'] * 1e6:.1f} us/event, "
              f"{result['main_thread_busy']:.0%} busy, peak RSS "
              f"{result['peak_rss_bytes'] / 2**20:,.0f} MiB, ahead in "
              f"{result['ahead_of_first']}/{a.rounds}")
