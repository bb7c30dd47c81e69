"""``python -m streams COMMAND``.

worker     Faust's worker for the driftwarden app (its options, e.g. ``--web-port``, work)
simulate   publish a seeded prediction/label stream with an optional change
tail       print retraining events as they arrive
demo       local end to end: worker + simulated drifting traffic + the retraining events
reference  ``reference build DATA --model M --version V``: publish a reference profile
bench      end-to-end benchmark against the broker; ``bench drift``: drift cost in-process
soak       worker RSS over a long run at a steady rate (30 minutes by default)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import gc
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, UnknownTopicOrPartitionError

from models.errors import ConfigError, InvalidEvent
from models.events import parse_prediction
from models.reference import MAX_BINS, MAX_TOP_K
from models.simulation import Scenario, simulate
from streams import bench, soak
from streams.bench_e2e import at_least
from streams.groups import prepare_group
from streams.settings import Settings
from streams.topics import (
    REFERENCE_MAX_BYTES,
    UNREACHABLE,
    TopicNames,
    ensure_topics,
    unreachable,
)

__all__ = ["main"]

_OWN_COMMANDS = ("simulate", "tail", "demo", "reference", "bench", "soak")
# Faust's own commands, which run against the app like ``worker`` (``faust --help``).
_FAUST_COMMANDS = frozenset({"worker", "agents", "clean-versions", "completion", "livecheck",
                             "model", "models", "reset", "send", "tables"})


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv:  # Faust's help would show its own commands, not driftwarden's
            _parser().print_help(sys.stderr)
            sys.exit(2)
        if argv[0] in (*_OWN_COMMANDS, "-h", "--help"):
            parser = _parser()
            args = parser.parse_args(argv)
            sys.exit(args.func(args) or 0)
        if not argv[0].startswith("-") and argv[0] not in _FAUST_COMMANDS:
            # Faust would say "No such command" and point at its own help.
            commands = ("worker", *_OWN_COMMANDS)
            close = difflib.get_close_matches(argv[0], commands, n=1)
            _parser().print_usage(sys.stderr)
            print(f"driftwarden: unknown command {argv[0]!r}"
                  + (f"; did you mean {close[0]!r}?" if close else "")
                  + f" (commands: {', '.join(commands)})", file=sys.stderr)
            sys.exit(2)
        _worker(argv)
    except ConfigError as exc:
        print(f"driftwarden: {exc}", file=sys.stderr)
        sys.exit(2)


def _worker(argv: list[str]) -> None:
    from streams.agents import Pipeline
    from streams.app import create_app
    from streams.metrics import Snapshot, serve, worker_info
    from streams.tables import declare_tables

    settings = Settings.from_env()
    settings.policies()  # a bad policy file stops the worker before Kafka is touched
    settings.make_data_dir()  # and so does a data directory that cannot be made
    snapshot = Snapshot(max_models=settings.max_models)
    worker = argv[:1] == ["worker"] and not {"-h", "--help"} & set(argv)
    if worker:
        # A busy port or a bad host stops the worker before Kafka is touched, too.
        serve(snapshot, settings.metrics_host, settings.metrics_port)
        # Fail before Faust starts: missing broker, or predictions/labels not co-partitioned,
        # or workers of the other layout (DRIFTWARDEN_ROLE) running on the same topics.
        partitions = asyncio.run(ensure_topics(settings))
        asyncio.run(prepare_group(settings))
    else:
        partitions = settings.partitions
    app = create_app(settings, partitions)
    Pipeline(app, settings, declare_tables(app, partitions, settings), snapshot).register()
    if worker:
        worker_info({
            "app_id": settings.app_id, "role": settings.role,
            "topic_prefix": settings.topic_prefix,
            "driftwarden": _version("driftwarden"), "faust": _version("faust-streaming"),
            "river": _version("river"), "partitions": str(partitions), "store": settings.store,
        })
    sys.argv = ["driftwarden", *argv]
    keep_gc_off_the_event_path()
    app.main()


def keep_gc_off_the_event_path() -> None:
    """Freeze what start-up made and let the young generation grow to 100,000 objects.

    faust, aiokafka, river, numpy, scipy and pandas leave ~150,000 tracked objects that
    live as long as the worker, and every full collection walked them all: about 95 ms
    each, 15 of them over the bench's 200,000 events, 14% of the worker's CPU time. Frozen
    (``gc.freeze``), the collector skips them; reference counting still frees whatever
    becomes garbage, only cycles among start-up objects would stay.

    The young generation's count is objects made less objects freed, never below zero:
    a batch's records (a few per event) raise it by ~30,000 while they live, then their
    frees take it back to zero. At 10,000 every batch set off young collections that
    found nothing to free (they walked the live batch: ~2.5 ms each, 140 of them and 12
    older ones over the bench's 300,000 events, ~5% of the worker's CPU); at 100,000 a
    batch no longer reaches it, and cyclic garbage (the event path makes none; asyncio and
    Faust some) still sets off a collection once 100,000 objects of it accumulate:
    ``python -m streams bench compare`` 36,942 vs 38,411 events/s (ahead 3/3), main
    thread 22.4 vs 21.3 us per event.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 10, 10)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that gives every option's default (README: "--help lists all its options
    and their defaults"), with or without a help text of its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings
                or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """The commands' parser; its subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m streams",
        description="driftwarden. The worker itself: python -m streams worker [-l info] "
                    "(its options: python -m streams worker --help).")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    sim = sub.add_parser("simulate", help="publish a seeded prediction/label stream")
    _scenario_args(sim)
    sim.add_argument("--throttle", type=at_least(0.0, float), default=0.0,
                     help="events per second to publish at (0: as fast as possible)")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(func=lambda a: asyncio.run(_simulate(a)))

    tail = sub.add_parser("tail", help="print retraining events")
    tail.add_argument("--from-beginning", action="store_true",
                      help="from the topic's first event, not only new ones")
    tail.add_argument("--max-events", type=at_least(0), default=0,
                      help="stop after this many (0: no limit)")
    tail.add_argument("--timeout", type=at_least(0.0, float), default=0.0,
                      help="stop after this many seconds (0: no limit)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.set_defaults(func=lambda a: asyncio.run(_tail(a)))

    ref = sub.add_parser("reference", help="reference profiles").add_subparsers(required=True)
    build = ref.add_parser("build", help="profile a CSV/Parquet file and publish it")
    build.add_argument("data", help="training or validation data, .csv or .parquet")
    build.add_argument("--model", required=True, help="model name the profile is for")
    build.add_argument("--version", required=True, help="model version it is for")
    build.add_argument("--prediction", help="column holding the model's prediction")
    build.add_argument("--label", help="column holding the true label")
    build.add_argument("--task", choices=("classification", "regression"),
                       default="classification", help="what the model does")
    build.add_argument("--features", help="comma-separated feature columns (default: all)")
    build.add_argument("--bins", type=at_least(2, most=MAX_BINS), default=10,
                       help=f"quantile bins per numeric feature (2-{MAX_BINS})")
    build.add_argument("--top-k", type=at_least(1, most=MAX_TOP_K), default=20,
                       help=f"categories kept per feature (1-{MAX_TOP_K})")
    build.add_argument("--output", help="also write the profile JSON to this file")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=lambda a: asyncio.run(_reference_build(a)))

    bench.add_parser(sub)
    soak.add_parser(sub)

    demo = sub.add_parser("demo", help="worker + drifting simulated traffic + retraining events")
    _scenario_args(demo, n=80_000, change_at=50_000)
    # A steady rate, as from live model services; 0 publishes everything at once.
    demo.add_argument("--throttle", type=at_least(0.0, float), default=3000.0,
                      help="events per second to publish at (0: as fast as possible)")
    demo.set_defaults(func=_demo)
    return parser


def _scenario_args(p: argparse.ArgumentParser, n: int = 100_000,
                   change_at: int | None = None) -> None:
    p.add_argument("--n", type=int, default=n, help="predictions to publish")
    p.add_argument("--model", default="demo", help="model name of the events")
    p.add_argument("--version", default="1", help="model version of the events")
    p.add_argument("--seed", type=int, default=42, help="random seed: same seed, same events")
    p.add_argument("--error-before", type=float, default=0.1,
                   help="error rate before --change-at (0-0.5)")
    p.add_argument("--error-after", type=float, default=0.3,
                   help="error rate from --change-at on (0-1)")
    p.add_argument("--change-at", type=int, default=change_at,
                   help="outcome at which the error rate changes (none: never)")
    p.add_argument("--unlabelled", type=float, default=0.1,
                   help="share of predictions that never get a label (0-1)")
    p.add_argument("--max-delay", type=float, default=30.0, help="label delay upper bound, s")
    p.add_argument("--start-ts", type=float, default=None, help="event time of the first one")


def _scenario(a: argparse.Namespace) -> Scenario:
    """The simulated traffic the arguments ask for; a bad argument is a ConfigError
    naming its option (checked before anything touches Kafka)."""
    if a.max_delay < 0:
        raise ConfigError(f"--max-delay must be at least 0, got {a.max_delay:g}")
    try:
        scenario = Scenario(
            n=a.n, model=a.model, version=a.version, seed=a.seed, error_before=a.error_before,
            error_after=a.error_after, change_at=a.change_at, unlabelled=a.unlabelled,
            label_delay=(0.0, a.max_delay),
            start_ts=a.start_ts if a.start_ts is not None else time.time() - a.n / 10.0,
        )
    except ValueError as exc:  # name the option, as the user typed it
        options = {"error_before": "--error-before", "error_after": "--error-after",
                   "unlabelled": "--unlabelled", "n": "--n", "label_delay": "--max-delay"}
        raise ConfigError(re.sub(r"\b(\w+)\b", lambda m: options.get(m[1], m[1]),
                                 str(exc))) from None
    return _publishable(scenario)


def _publishable(scenario: Scenario) -> Scenario:
    """The scenario, unless the worker would dead-letter its events (checked on its first
    prediction by the worker's own validator): a ConfigError naming the option."""
    first = next(ev for ev in simulate(scenario) if ev.topic == "predictions")
    try:
        parse_prediction(orjson.dumps(first.value), time.time())
    except InvalidEvent as exc:
        option = {"invalid_model": "--model", "invalid_version": "--version",
                  "ts_out_of_range": "--start-ts"}.get(exc.reason, "the arguments")
        raise ConfigError(f"{option}: the worker would dead-letter every event: {exc}"
                          ) from None
    return scenario


async def _simulate(a: argparse.Namespace) -> None:
    from tqdm import tqdm

    settings = Settings.from_env()
    scenario = _scenario(a)
    await ensure_topics(settings)
    names = TopicNames.from_settings(settings)
    topic = {"predictions": names.predictions, "labels": names.labels}
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, linger_ms=20, acks="all",
        max_batch_size=256 * 1024, **settings.aiokafka_security())
    await producer.start()
    try:
        started = time.monotonic()
        with tqdm(desc="events", unit="ev", disable=a.quiet, file=sys.stderr) as bar:
            for i, ev in enumerate(simulate(scenario)):
                await producer.send(topic[ev.topic], orjson.dumps(ev.value), key=ev.key.encode())
                if i % 1000 == 999:
                    bar.update(1000)
                    if a.throttle:
                        ahead = (i + 1) / a.throttle - (time.monotonic() - started)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            await producer.flush()
    finally:
        await producer.stop()


async def _reference_build(a: argparse.Namespace) -> None:
    from tqdm import tqdm

    from models.reference import (
        ReferenceProfile,
        build_profile,
        numbers_in_categoricals,
        read_frame,
    )

    settings = Settings.from_env()
    with tqdm(total=3, desc="reference", unit="step", disable=a.quiet, file=sys.stderr) as bar:
        bar.set_postfix_str(f"reading {a.data}")
        frame = read_frame(a.data)
        bar.update()
        bar.set_postfix_str(f"profiling {len(frame):,} rows")
        features = a.features.split(",") if a.features else None
        named = [("--prediction", a.prediction), ("--label", a.label),
                 *(("--features", f) for f in features or [])]
        for option, column in named:
            if column is not None and column not in frame.columns:
                shown = ", ".join(map(repr, list(frame.columns)[:20]))
                more = "" if len(frame.columns) <= 20 else f" and {len(frame.columns) - 20} more"
                raise ConfigError(f"{option} {column!r} is not a column of {a.data} "
                                  f"(its columns: {shown}{more})")
        profile = build_profile(frame, a.model, a.version, prediction=a.prediction,
                                label=a.label, task=a.task, bins=a.bins, top_k=a.top_k,
                                features=features)
        bar.update()
        for name, share in numbers_in_categoricals(frame, profile).items():
            print(f"driftwarden: warning: feature {name!r} is profiled as categories, but "
                  f"{share:.0%} of its values are numbers written as text; live events that "
                  "send numbers will match none of them (clean the column, or leave it out "
                  "with --features)", file=sys.stderr)
        for name, feature in profile.features.items():
            if not any(feature.counts):
                print(f"driftwarden: warning: feature {name!r} has no values in {a.data}: "
                      "its drift is not judged, only its missing rate is exported",
                      file=sys.stderr)
        most = settings.policies().for_model(a.model).drift_max_features
        if len(profile.features) > most:
            print(f"driftwarden: warning: the profile has {len(profile.features):,} features; "
                  f"the worker tracks the first {most:,} by name (policy "
                  f"drift_max_features of {a.model!r}); choose them with --features",
                  file=sys.stderr)
        raw = profile.to_json()
        if len(raw) > REFERENCE_MAX_BYTES:
            raise ConfigError(
                f"the profile of {a.data} is {len(raw):,} bytes, over the "
                f"{REFERENCE_MAX_BYTES:,} a message on the references topic may be: profile "
                "fewer features (--features) or keep fewer categories (--top-k)")
        try:  # what the worker will make of it, before anyone else sees it
            ReferenceProfile.from_json(raw)
        except ConfigError as exc:
            raise ConfigError(f"the profile of {a.data} would be refused by the worker: "
                              f"{exc}") from None
        if a.output:
            try:
                with open(a.output, "wb") as out:
                    out.write(raw)
            except OSError as exc:
                raise ConfigError(f"--output {a.output}: {exc.strerror}") from None
        bar.set_postfix_str("publishing")
        await ensure_topics(settings)
        topic = TopicNames.from_settings(settings).references
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all",
                                    max_request_size=REFERENCE_MAX_BYTES,
                                    **settings.aiokafka_security())
        await producer.start()
        try:
            await producer.send_and_wait(topic, raw, key=profile.key.encode())
        except MessageSizeTooLargeError:  # a topic made before it allowed REFERENCE_MAX_BYTES
            raise ConfigError(
                f"topic {topic!r} refuses the profile's {len(raw):,} bytes; allow it with "
                f"kafka-configs.sh --alter --entity-type topics --entity-name {topic} "
                f"--add-config max.message.bytes={REFERENCE_MAX_BYTES}") from None
        finally:
            await producer.stop()
        bar.update()
    print(f"published reference {profile.key} ({profile.n:,} rows, {len(profile.features)} "
          f"features, fingerprint {profile.fingerprint()}) to {topic}")


def format_event(ev: dict[str, Any]) -> str:
    """One retraining event as a readable block."""
    lines = [f"[{ev['severity'].upper()}] {ev['id']}  model={ev['model']} version={ev['version']}"]
    for r in ev["reasons"]:
        detail = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k != "kind")
        lines.append(f"    reason: {r['kind']} ({detail})")
    e = ev["evidence"]
    lines.append(f"    evidence: predictions_seen={e['predictions_seen']} "
                 f"outcomes_seen={e['outcomes_seen']}")
    m = ev["metrics"]
    lines.append(f"    accuracy={_fmt(m.get('accuracy'))}"
                 f" reference={_fmt(m.get('accuracy_reference'))}"
                 f" estimated={_fmt(m.get('estimated_accuracy'))}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


async def _tail(a: argparse.Namespace) -> int:
    """Print retraining events; exit 1 when ``--timeout`` ends it short of
    ``--max-events`` (``demo`` relies on that)."""
    settings = Settings.from_env()
    names = TopicNames.from_settings(settings)
    consumer = AIOKafkaConsumer(
        names.retraining, bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest" if a.from_beginning else "latest",
        enable_auto_commit=False, **settings.aiokafka_security())
    try:
        await consumer.start()
    except UNREACHABLE as exc:
        await consumer.stop()
        raise unreachable(settings, exc) from None
    except UnknownTopicOrPartitionError:
        await consumer.stop()
        raise ConfigError(f"topic {names.retraining!r} does not exist (a worker creates it; "
                          "check DRIFTWARDEN_TOPIC_PREFIX)") from None
    seen = 0
    deadline = time.monotonic() + a.timeout if a.timeout else None
    try:
        while deadline is None or time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    ev = orjson.loads(rec.value)
                    print(orjson.dumps(ev).decode() if a.json else format_event(ev), flush=True)
                    seen += 1
                    if a.max_events and seen >= a.max_events:
                        return 0
    finally:
        await consumer.stop()
    if a.max_events:
        print(f"tail: {seen} of {a.max_events} retraining events on {names.retraining!r} "
              f"within --timeout {a.timeout:g} s", file=sys.stderr)
        return 1
    return 0


async def _publish_while(worker: subprocess.Popen[bytes], a: argparse.Namespace) -> bool:
    """:func:`_simulate`, cut short if the worker exits meanwhile (a bad policy file, a
    busy metrics port): True if it published everything."""
    publish = asyncio.ensure_future(_simulate(a))
    while not publish.done():
        await asyncio.wait({publish}, timeout=0.5)
        if worker.poll() is not None and not publish.done():
            publish.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publish
            return False
    publish.result()
    return True


def _demo(a: argparse.Namespace) -> int:
    """Run a worker, publish drifting traffic, print the retraining events it emits."""
    _scenario(a)  # bad arguments stop it before anything starts
    env = {**os.environ, "DRIFTWARDEN_BROKER": os.environ.get(
        "DRIFTWARDEN_BROKER", "kafka://127.0.0.1:9092")}
    env.setdefault("DRIFTWARDEN_TOPIC_PREFIX", f"demo-{int(time.time())}.")
    os.environ.update(env)
    print(f"demo: topics prefixed {env['DRIFTWARDEN_TOPIC_PREFIX']!r}; metrics on "
          f"http://127.0.0.1:{Settings.from_env().metrics_port}/metrics", flush=True)
    worker = subprocess.Popen([sys.executable, "-m", "streams", "worker", "-l", "warn"],
                              env=env)
    tail = subprocess.Popen([sys.executable, "-m", "streams", "tail", "--from-beginning",
                             "--max-events", "1", "--timeout", "600"], env=env)
    try:
        asyncio.run(ensure_topics(Settings.from_env()))
        print(f"demo: publishing {a.n} predictions; error {a.error_before:.0%} -> "
              f"{a.error_after:.0%} at outcome {a.change_at}", flush=True)
        if asyncio.run(_publish_while(worker, argparse.Namespace(**{**vars(a), "quiet": False}))):
            print("demo: published" + ("" if tail.poll() is not None else
                                       "; waiting for the retraining event"), flush=True)
            deadline = time.monotonic() + 600
            while tail.poll() is None and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if tail.poll() is not None:
                return tail.returncode
        if worker.poll() is not None:
            print(f"demo: the worker stopped (exit {worker.returncode}); its error is above",
                  file=sys.stderr, flush=True)
            return worker.returncode or 1
        return tail.wait(timeout=30)
    finally:
        for proc in (tail, worker):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
