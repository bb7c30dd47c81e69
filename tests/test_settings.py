"""Configuration: every bad value is a ConfigError naming the variable and the value, before
anything touches Kafka (README, "Configuration")."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.errors import ConfigError
from streams.app import create_app
from streams.settings import Settings
from tests.streams.harness import ROOT  # the repository root

BAD = [
    ({"DRIFTWARDEN_BROKER": "localhost:9092"},
     "DRIFTWARDEN_BROKER must be kafka://host:port (port 1-65535, 9092 if left out), "
     "several separated by ';' or ',', got 'localhost:9092'"),
    ({"DRIFTWARDEN_BROKER": "kafka://h1:99999"},
     "DRIFTWARDEN_BROKER must be kafka://host:port (port 1-65535, 9092 if left out), "
     "several separated by ';' or ',', got 'kafka://h1:99999'"),
    ({"DRIFTWARDEN_BROKER": "kafka://h1:9092;h2:x"},
     "DRIFTWARDEN_BROKER must be kafka://host:port (port 1-65535, 9092 if left out), "
     "several separated by ';' or ',', got 'kafka://h1:9092;h2:x'"),
    ({"DRIFTWARDEN_STORE": "memory"},
     "DRIFTWARDEN_STORE must be memory:// or rocksdb://, got 'memory'"),
    ({"DRIFTWARDEN_METRICS_PORT": "0"},
     "DRIFTWARDEN_METRICS_PORT must be between 1 and 65535, got 0"),
    ({"DRIFTWARDEN_APP_ID": ""}, "DRIFTWARDEN_APP_ID must not be empty, got ''"),
    ({"DRIFTWARDEN_METRICS_HOST": " "}, "DRIFTWARDEN_METRICS_HOST must not be empty, got ' '"),
    ({"DRIFTWARDEN_TOPIC_PREFIX": "team a/"},
     "DRIFTWARDEN_TOPIC_PREFIX may hold only ASCII letters, digits, '.', '_' and '-' (it is "
     "part of Kafka topic names), got 'team a/'"),
    ({"DRIFTWARDEN_APP_ID": "dw:prod"},
     "DRIFTWARDEN_APP_ID may hold only ASCII letters, digits, '.', '_' and '-' (it is part of "
     "Kafka topic names), got 'dw:prod'"),
    ({"DRIFTWARDEN_TOPIC_PREFIX": "t.", "DRIFTWARDEN_APP_ID": "x" * 220},
     "DRIFTWARDEN_TOPIC_PREFIX and DRIFTWARDEN_APP_ID may be 221 characters together (Kafka "
     "topic names end at 249), got 222"),
    ({"DRIFTWARDEN_LABEL_TTL_SECONDS": "inf"},
     "DRIFTWARDEN_LABEL_TTL_SECONDS must be a positive finite number, got 'inf'"),
    ({"DRIFTWARDEN_LABEL_TTL_SECONDS": "3600", "DRIFTWARDEN_DUPLICATE_WINDOW_SECONDS": "7200"},
     "DRIFTWARDEN_DUPLICATE_WINDOW_SECONDS must be at most DRIFTWARDEN_LABEL_TTL_SECONDS "
     "(3600), got 7200"),
    ({"DRIFTWARDEN_DUPLICATE_WINDOW_SECONDS": "0"},
     "DRIFTWARDEN_DUPLICATE_WINDOW_SECONDS must be a positive finite number, got '0'"),
    ({"DRIFTWARDEN_SESSION_TIMEOUT_SECONDS": "0"},
     "DRIFTWARDEN_SESSION_TIMEOUT_SECONDS must be a positive finite number, got '0'"),
    ({"DRIFTWARDEN_COMPRESSION": "brotli"},
     "DRIFTWARDEN_COMPRESSION must be one of none, gzip, snappy, lz4, zstd, got 'brotli'"),
    ({"DRIFTWARDEN_SECURITY_PROTOCOL": "TLS"},
     "DRIFTWARDEN_SECURITY_PROTOCOL must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL, "
     "got 'TLS'"),
    ({"DRIFTWARDEN_SSL_CAFILE": "/etc/hostname"},
     "DRIFTWARDEN_SSL_CAFILE is set, but DRIFTWARDEN_SECURITY_PROTOCOL=PLAINTEXT does not use "
     "TLS (set SSL or SASL_SSL)"),
    ({"DRIFTWARDEN_SECURITY_PROTOCOL": "SSL", "DRIFTWARDEN_SSL_CAFILE": "/no/ca.pem"},
     "DRIFTWARDEN_SSL_CAFILE: no such file '/no/ca.pem'"),
    # Fixed: a directory or a device was reported as "no such file".
    ({"DRIFTWARDEN_SECURITY_PROTOCOL": "SSL", "DRIFTWARDEN_SSL_CAFILE": "/tmp"},
     "DRIFTWARDEN_SSL_CAFILE: '/tmp' is not a file"),
    ({"DRIFTWARDEN_SECURITY_PROTOCOL": "SSL", "DRIFTWARDEN_SSL_CAFILE": "/dev/null"},
     "DRIFTWARDEN_SSL_CAFILE: '/dev/null' is not a file"),
    ({"DRIFTWARDEN_SECURITY_PROTOCOL": "SSL", "DRIFTWARDEN_SSL_KEYFILE": "/etc/hostname"},
     "DRIFTWARDEN_SSL_KEYFILE is set without DRIFTWARDEN_SSL_CERTFILE, the certificate it is "
     "the key of"),
]


@pytest.mark.parametrize(("env", "message"), BAD)
def test_a_bad_value_names_its_variable_and_the_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert str(raised.value) == message


def test_good_values_pass() -> None:
    settings = Settings.from_env({
        "DRIFTWARDEN_BROKER": "kafka://k1:9092; kafka://[::1]:9093,k-3.example",
        "DRIFTWARDEN_STORE": "rocksdb://", "DRIFTWARDEN_SESSION_TIMEOUT_SECONDS": "0.5"})
    # Separated by ; or , (as Faust reads it), kafka:// on the first, 9092 by default.
    assert settings.broker == "kafka://k1:9092;kafka://[::1]:9093;kafka://k-3.example:9092"
    assert settings.bootstrap_servers == "k1:9092,[::1]:9093,k-3.example:9092"
    assert settings.servers == [("k1", 9092), ("::1", 9093), ("k-3.example", 9092)]
    assert settings.store == "rocksdb://" and settings.session_timeout_seconds == 0.5
    # The longest prefix and app id Kafka's 249-character topic names allow.
    longest = Settings.from_env({"DRIFTWARDEN_TOPIC_PREFIX": "t-1.",
                                 "DRIFTWARDEN_APP_ID": "dw_" + "x" * 214})
    assert len(longest.group + "-monitor-__assignor-__leader") == 249
    # The join keeps matched ids a label TTL, or less when asked to.
    assert Settings.from_env({"DRIFTWARDEN_LABEL_TTL_SECONDS": "3600"}).duplicate_window == 3600
    assert Settings.from_env({"DRIFTWARDEN_DUPLICATE_WINDOW_SECONDS": "900"}
                             ).duplicate_window == 900


def _pem(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl not found: the TLS tests make their certificate with it "
                    "(Debian package openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=driftwarden-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_files_that_load_are_used_and_ones_that_do_not_are_named(tmp_path: Path) -> None:
    cert, key = _pem(tmp_path)
    tls = {"DRIFTWARDEN_SECURITY_PROTOCOL": "SSL", "DRIFTWARDEN_SSL_CAFILE": str(cert),
           "DRIFTWARDEN_SSL_CERTFILE": str(cert), "DRIFTWARDEN_SSL_KEYFILE": str(key)}
    context = Settings.from_env(tls).aiokafka_security()["ssl_context"]
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName",
                                                                 "driftwarden-test"),),)]
    with pytest.raises(ConfigError, match=r"^DRIFTWARDEN_SSL_CAFILE \(.*key\.pem\) does not load "
                                          r"as PEM certificates: "):
        Settings.from_env({**tls, "DRIFTWARDEN_SSL_CAFILE": str(key)})
    with pytest.raises(ConfigError, match=r"^DRIFTWARDEN_SSL_CERTFILE \(.*cert\.pem\) and "
                                          r"_KEYFILE \(.*cert\.pem\) do not load as a "):
        Settings.from_env({**tls, "DRIFTWARDEN_SSL_KEYFILE": str(cert)})


def test_a_session_timeout_above_fausts_request_timeout_lengthens_it() -> None:
    # Faust refuses a session timeout above its request timeout (90 s by default).
    long = create_app(Settings.from_env({"DRIFTWARDEN_SESSION_TIMEOUT_SECONDS": "300"}), 8)
    assert (long.conf.broker_session_timeout, long.conf.broker_request_timeout) == (300.0, 310.0)
    short = create_app(Settings.from_env({}), 8)
    assert (short.conf.broker_session_timeout, short.conf.broker_request_timeout) == (10.0, 90.0)


def test_a_bad_policy_file_stops_the_worker_before_kafka_is_touched(tmp_path: Path) -> None:
    # No broker listens on port 1: the worker must not get as far as trying it.
    env = {"DRIFTWARDEN_BROKER": "kafka://127.0.0.1:1", "PATH": "/usr/bin:/bin",
           "DRIFTWARDEN_POLICY_FILE": str(tmp_path / "missing.toml")}
    done = subprocess.run([sys.executable, "-m", "streams", "worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "DRIFTWARDEN_POLICY_FILE cannot be read: " in done.stderr
    assert "missing.toml" in done.stderr


def test_a_policy_file_that_is_not_utf8_is_named_without_a_traceback(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_bytes(b"[default]\nwindow = 5  # caf\xe9\n")  # Latin-1, not TOML's UTF-8
    env = {"DRIFTWARDEN_BROKER": "kafka://127.0.0.1:1", "PATH": "/usr/bin:/bin",
           "DRIFTWARDEN_POLICY_FILE": str(policy)}
    done = subprocess.run([sys.executable, "-m", "streams", "worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        2, f"driftwarden: DRIFTWARDEN_POLICY_FILE ({policy}) is not UTF-8: byte 27 is b'\\xe9'\n")


# Fixed (streams/settings.py, Settings.make_data_dir): a data directory that could not be
# made stopped the worker with a traceback (FileExistsError), after it had created the
# topics and checked the group.
@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_a_data_dir_that_cannot_be_made_stops_the_worker_before_kafka_is_touched(
        tmp_path: Path, kind: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    data_dir = afile if kind == "file" else afile / "data"
    env = {"DRIFTWARDEN_BROKER": "kafka://127.0.0.1:1", "PATH": "/usr/bin:/bin",
           "DRIFTWARDEN_DATA_DIR": str(data_dir)}
    done = subprocess.run([sys.executable, "-m", "streams", "worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    why = "is not a directory" if kind == "file" else "cannot be made: Not a directory"
    assert (done.returncode, done.stderr) == (
        2, f"driftwarden: DRIFTWARDEN_DATA_DIR: '{data_dir}' {why}\n")
