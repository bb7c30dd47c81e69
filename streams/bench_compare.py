"""``python -m streams bench compare BUILD BUILD ...``: builds taking turns over one input.

Identical worker runs on a shared 2-core machine differ by 15-20%, and runs an hour apart
by more (README, Performance), so two builds are not compared by two bench runs: workers
of each build take turns over one produced input, round after round, each with a fresh
consumer group, and each round compares like with like. A change is judged by the
medians and by how many rounds it was ahead in.

A BUILD is a git revision of this checkout (its ``streams/`` and ``models/``, extracted
once under ``.local/bench/builds/<commit>``; a revision containing ``:`` is not taken) or
``.`` (this checkout's files as they are now), optionally followed by environment for its
workers: ``.:DRIFTWARDEN_BATCH_SIZE=24000`` or
``HEAD~1:DRIFTWARDEN_COMPRESSION=none,DRIFTWARDEN_BATCH_SIZE=1000``. A build's workers run
with its directory as their working directory, first on ``sys.path``: the installed
package (an editable install points at this checkout) cannot shadow it. The builds take
turns in a rotating order (the first build of one round is the last of the next), so
that none always runs first after the input was published.

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
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from models.errors import ConfigError
from streams import bench_e2e
from streams.settings import Settings
from streams.topics import TopicNames

__all__ = ["Build", "add_parser", "compare", "resolve"]

#: The checkout this module belongs to: ``.`` builds run it, revisions come from its git.
ROOT = Path(__file__).resolve().parents[1]
#: What a build is made of: the code a worker imports.
PACKAGES = ("streams", "models")
_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
#: Set for every worker by the bench (WorkerProcess, start_split): not a build's to choose.
_RESERVED = frozenset({"DRIFTWARDEN_BROKER", "DRIFTWARDEN_TOPIC_PREFIX", "DRIFTWARDEN_APP_ID",
                       "DRIFTWARDEN_METRICS_PORT", "DRIFTWARDEN_DATA_DIR", "DRIFTWARDEN_ROLE",
                       "PYTHONPATH"})


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
        path = os.pathsep.join(filter(None, (str(self.path), os.environ.get("PYTHONPATH"))))
        return {**self.env, "PYTHONPATH": path}


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


def parse(spec: str) -> tuple[str, dict[str, str]]:
    """A BUILD argument's revision (or ``.``) and environment; raises ConfigError
    saying what is wrong with it.

    >>> parse(".:DRIFTWARDEN_BATCH_SIZE=24000,DRIFTWARDEN_COMPRESSION=none")
    ('.', {'DRIFTWARDEN_BATCH_SIZE': '24000', 'DRIFTWARDEN_COMPRESSION': 'none'})
    >>> for spec in (".:BATCH", "x:DRIFTWARDEN_ROLE=join"):
    ...     try:
    ...         parse(spec)
    ...     except ConfigError as exc:
    ...         print(exc)
    build '.:BATCH': 'BATCH' is not NAME=VALUE (and a revision cannot contain ':')
    build 'x:DRIFTWARDEN_ROLE=join': DRIFTWARDEN_ROLE is set by the bench (by --layout)
    """
    rev, _, assignments = spec.partition(":")
    if not rev:
        raise ConfigError(f"build {spec!r}: no revision (a git revision, or '.')")
    env: dict[str, str] = {}
    for item in filter(None, assignments.split(",")):
        name, eq, value = item.partition("=")
        if not eq or not _NAME.fullmatch(name):
            raise ConfigError(f"build {spec!r}: {item!r} is not NAME=VALUE (and a revision "
                              "cannot contain ':')")
        if name in _RESERVED:
            why = "by --layout" if name == "DRIFTWARDEN_ROLE" else "per worker"
            raise ConfigError(f"build {spec!r}: {name} is set by the bench ({why})")
        env[name] = value
    return rev, env


def resolve(spec: str, root: Path = ROOT) -> Build:
    """The Build a BUILD argument names, its revision extracted; raises ConfigError.

    >>> b = resolve(".:DRIFTWARDEN_BATCH_SIZE=24000")
    >>> b.commit, b.path == ROOT, b.env
    (None, True, {'DRIFTWARDEN_BATCH_SIZE': '24000'})
    """
    return _build(spec, *parse(spec), root)


def _build(spec: str, rev: str, env: dict[str, str], root: Path = ROOT) -> Build:
    if rev == ".":
        return Build(spec, None, root, env)
    found = _git(spec, root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode != 0:
        raise ConfigError(f"build {spec!r}: {rev!r} is not a commit of the git repository "
                          f"at {root}")
    commit = found.stdout.decode().strip()
    return Build(spec, commit, _extract(spec, root, commit), env)


def _git(spec: str, root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True)
    except OSError as exc:  # no git
        raise ConfigError(f"build {spec!r}: git cannot be run: {exc}") from None


def _extract(spec: str, root: Path, commit: str) -> Path:
    """The packages of ``commit``, extracted once (into a directory of this process,
    renamed into place when complete: an interrupted extraction is never taken for one,
    and of two processes extracting at once, the second keeps the first's)."""
    dest = root / ".local" / "bench" / "builds" / commit
    if dest.is_dir():
        return dest
    archive = _git(spec, root, "archive", "--format=tar", commit, *PACKAGES)
    if archive.returncode != 0:
        raise ConfigError(f"build {spec!r}: git archive of {commit} failed: "
                          f"{archive.stderr.decode(errors='replace').strip()}")
    partial = dest.with_name(f"{commit}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(partial, filter="data")
        else:  # Python < 3.11.4: no filters; the archive is this repository's own
            tar.extractall(partial)
    try:
        partial.rename(dest)
    except OSError:
        if not dest.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process was first
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
    for flag, value in (("--rounds", a.rounds), ("--events", a.events)):
        if value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
    # Every argument checked before any revision is extracted.
    parsed = [(spec, *parse(spec)) for spec in a.builds]
    builds = [_build(spec, rev, env) for spec, rev, env in parsed]
    settings, partitions = bench_e2e.fresh_topics("compare")
    print(f"compare: {a.events:,} predictions + {a.events:,} labels, {partitions} partitions, "
          f"layout {a.layout}, {a.rounds} round(s) of {len(builds)} builds", flush=True)
    for build in builds:
        print(f"  {build.spec}: {build.commit or 'this checkout'} ({build.path})", flush=True)
    asyncio.run(bench_e2e.produce(settings, bench_e2e.bench_input(TopicNames.from_settings(
        settings), a.events)))
    runs: list[list[dict[str, Any]]] = [[] for _ in builds]
    for r in range(a.rounds):
        for k in range(len(builds)):
            i = (r + k) % len(builds)  # rotating: each build runs first in some round
            build = builds[i]
            try:
                run = _run(settings, build, a.layout, a.events, r * len(builds) + k)
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
