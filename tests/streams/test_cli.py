"""The commands around the worker (``python -m streams tail``): exit codes and errors."""

from __future__ import annotations

import re
import subprocess
import sys

import orjson

from tests.streams.harness import ROOT, create_topics, produce, run


def _streams(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams", *args], cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True, timeout=120)


def test_tail_without_a_broker_names_the_variable() -> None:
    done = _streams("tail", "--timeout", "2", DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert ("driftwarden: cannot reach Kafka at DRIFTWARDEN_BROKER='kafka://127.0.0.1:1'"
            in done.stderr)
    assert "Traceback" not in done.stderr


def test_tail_prints_events_and_fails_when_too_few_came(kafka_broker: str, prefix: str) -> None:
    env = {"DRIFTWARDEN_BROKER": f"kafka://{kafka_broker}", "DRIFTWARDEN_TOPIC_PREFIX": prefix}
    run(create_topics(kafka_broker, {prefix + "retraining": 1}))
    event = {"id": "m:1:000001", "model": "m", "version": "1", "severity": "warning"}
    run(produce(kafka_broker, [(prefix + "retraining", b"m", orjson.dumps(event))]))
    done = _streams("tail", "--from-beginning", "--json", "--max-events", "1",
                    "--timeout", "60", **env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [orjson.loads(line) for line in done.stdout.splitlines()] == [event]
    # Two wanted, one there: the timeout ends it, and says so (what `make run` relies on).
    done = _streams("tail", "--from-beginning", "--json", "--max-events", "2",
                    "--timeout", "3", **env)
    assert done.returncode == 1
    assert [orjson.loads(line) for line in done.stdout.splitlines()] == [event]
    assert (f"tail: 1 of 2 retraining events on '{prefix}retraining' within --timeout 3 s"
            in done.stderr)


# Fixed (streams/cli.py, _demo): the demo (what `make run` runs) went on publishing to a
# worker that had stopped at start-up, then waited 10 minutes for an event that could not
# come, the worker's one-line error far above.
def test_demo_stops_when_its_worker_does(kafka_broker: str, prefix: str, tmp_path) -> None:
    done = _streams("demo", "--n", "2000000", DRIFTWARDEN_BROKER=f"kafka://{kafka_broker}",
                    DRIFTWARDEN_TOPIC_PREFIX=prefix,
                    DRIFTWARDEN_POLICY_FILE=str(tmp_path / "missing.toml"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "DRIFTWARDEN_POLICY_FILE cannot be read" in done.stderr
    assert done.stderr.endswith("demo: the worker stopped (exit 2); its error is above\n")
    assert "demo: published" not in done.stdout  # cut short: 2,000,000 take minutes


def test_bad_simulation_arguments_are_named_before_kafka_is_touched() -> None:
    # No broker listens on port 1: an error about it would mean Kafka came first.
    for args, message in (
            (("simulate", "--unlabelled", "1"), "--unlabelled must be in [0, 1), got 1"),
            (("simulate", "--n", "-5"), "--n must be at least 1, got -5"),
            (("simulate", "--max-delay", "-5"), "--max-delay must be at least 0, got -5"),
            (("demo", "--error-before", "0.9"),
             "--error-before must be in [0, 0.5] and --error-after in [0, 1], got 0.9 and 0.3"),
            # What the worker would only dead-letter, checked by its own validator.
            (("simulate", "--model", ""), "--model: the worker would dead-letter every event: "
             "invalid_model: field 'model' must be a non-empty string"),
            (("simulate", "--version", ""), "--version: the worker would dead-letter every "
             "event: invalid_version: field 'version' must be a non-empty string"),
            (("demo", "--start-ts", "0"), "--start-ts: the worker would dead-letter every "
             "event: ts_out_of_range: field 'ts' is too far from the Kafka timestamp")):
        done = _streams(*args, DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
        assert (done.returncode, done.stderr.strip()) == (2, f"driftwarden: {message}"), args


def test_reference_output_that_cannot_be_written_is_named(tmp_path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("x,pred\n1.0,0\n2.0,1\n")
    for output, why in ((tmp_path / "no" / "such" / "p.json", "No such file or directory"),
                        (tmp_path, "Is a directory")):
        done = _streams("reference", "build", str(data), "--model", "m", "--version", "1",
                        "--prediction", "pred", "--output", str(output), "--quiet",
                        DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
        assert (done.returncode, done.stderr.strip()) == (
            2, f"driftwarden: --output {output}: {why}")


def test_reference_build_refuses_what_a_worker_could_not_take_before_kafka(
        tmp_path) -> None:
    # 12 columns of 1,000 distinct 400-character strings, all kept (--top-k 1000): a 4.9 MB
    # profile, over what the references topic takes. Nothing is published (no broker
    # listens on port 1: an error about it would mean Kafka came first).
    data = tmp_path / "wide.csv"
    columns = [f"c{j}" for j in range(12)]
    rows = [",".join(f"{j}{i:04d}" + "v" * 395 for j in range(12)) for i in range(1000)]
    data.write_text(",".join(columns) + "\n" + "\n".join(rows) + "\n")
    output = tmp_path / "p.json"
    done = _streams("reference", "build", str(data), "--model", "m", "--version", "1",
                    "--top-k", "1000", "--output", str(output), "--quiet",
                    DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.fullmatch(
        rf"driftwarden: the profile of {re.escape(str(data))} is [0-9,]+ bytes, over the "
        r"4,194,304 a message on the references topic may be: profile fewer features "
        r"\(--features\) or keep fewer categories \(--top-k\)\n", done.stderr), done.stderr
    assert not output.exists()

    done = _streams("reference", "build", str(data), "--model", "m", "--version", "1",
                    "--bins", "1001", DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
    assert done.returncode == 2
    assert "argument --bins: must be at most 1000, got 1001" in done.stderr

    done = _streams("reference", "build", str(data), "--model", "m", "--version", "1",
                    "--label", "c12", "--quiet", DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
    assert (done.returncode, done.stderr) == (
        2, f"driftwarden: --label 'c12' is not a column of {data} (its columns: 'c0', 'c1', "
           "'c2', 'c3', 'c4', 'c5', 'c6', 'c7', 'c8', 'c9', 'c10', 'c11')\n")


def test_reference_build_warns_of_a_numeric_column_read_as_categories(tmp_path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("amount,pred\n" + "".join(f"{i}.5,{i % 2}\n" for i in range(19)) + "?,0\n")
    done = _streams("reference", "build", str(data), "--model", "m", "--version", "1",
                    "--prediction", "pred", "--quiet", DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
    assert ("driftwarden: warning: feature 'amount' is profiled as categories, but 95% of its "
            "values are numbers written as text" in done.stderr), done.stderr
    # Then it goes on, to the broker (none here).
    assert done.returncode == 2 and "cannot reach Kafka" in done.stderr


def test_reference_build_warns_of_an_empty_column_and_of_more_features_than_tracked(
        tmp_path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("a,b,c,pred\n" + "".join(f",{i},{i % 3},{i % 2}\n" for i in range(20)))
    policy = tmp_path / "policy.toml"
    policy.write_text("[models.m]\ndrift_max_features = 2\n")
    output = tmp_path / "p.json"
    done = _streams("reference", "build", str(data), "--model", "m", "--version", "1",
                    "--prediction", "pred", "--output", str(output), "--quiet",
                    DRIFTWARDEN_BROKER="kafka://127.0.0.1:1",
                    DRIFTWARDEN_POLICY_FILE=str(policy))
    assert done.stderr.splitlines()[:2] == [
        f"driftwarden: warning: feature 'a' has no values in {data}: its drift is not "
        "judged, only its missing rate is exported",
        "driftwarden: warning: the profile has 3 features; the worker tracks the first 2 "
        "by name (policy drift_max_features of 'm'); choose them with --features",
    ], done.stderr
    assert orjson.loads(output.read_bytes())["features"]["a"]["counts"] == [0]


def test_help_lists_the_commands_and_every_options_default() -> None:
    # With no command at all: driftwarden's commands, not Faust's, and a usage error.
    done = _streams()
    assert done.returncode == 2
    assert done.stderr.startswith("usage: python -m streams [-h] COMMAND ...")
    assert "reference" in done.stderr and "python -m streams worker" in done.stderr
    # A misspelt command: driftwarden's usage, the nearest command, no broker needed.
    done = _streams("wokrer", DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
    assert (done.returncode, done.stderr.splitlines()[1:]) == (2, [
        "driftwarden: unknown command 'wokrer'; did you mean 'worker'? (commands: worker, "
        "simulate, tail, demo, reference, bench, soak)"])
    assert done.stderr.startswith("usage: python -m streams [-h] COMMAND ...")
    done = _streams("--help")
    assert done.returncode == 0
    for command in ("simulate", "tail", "reference", "bench", "soak", "demo", "worker"):
        assert command in done.stdout, command
    done = _streams("simulate", "--help")
    assert done.returncode == 0
    for text in ("predictions to publish (default: 100000)", "(default: 42)",
                 "(default: 0.1)", "(default: 0.0)"):
        assert text in " ".join(done.stdout.split()), text
    # A default the help already states is not given twice; demo's own defaults show.
    done = _streams("demo", "--help")
    assert ("outcome at which the error rate changes (none: never) (default: 50000)"
            in " ".join(done.stdout.split()))
    # The worker's own help (Faust's) needs no broker.
    done = _streams("worker", "--help", DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
    assert done.returncode == 0 and "Start worker instance" in done.stdout, done.stderr[-2000:]


def test_bench_and_soak_arguments_are_checked_before_they_run() -> None:
    for args, message in (
            (("bench", "drift", "--repeat", "0"),
             "python -m streams bench drift: error: argument --repeat: must be at least 1, "
             "got 0"),
            (("bench", "--events", "10"),
             "python -m streams bench: error: argument --events: must be at least 1000, got 10"),
            (("soak", "--minutes", "1"),
             "driftwarden: --minutes 1 leaves fewer than 4 samples (--sample-seconds 10) after "
             "--warmup-minutes 3")):
        done = _streams(*args, DRIFTWARDEN_BROKER="kafka://127.0.0.1:1")
        assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (2, message), args
