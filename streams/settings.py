"""Settings, read once from the environment (DESIGN.md section 7).

Every error names the variable that is wrong::

    >>> Settings.from_env({"DRIFTWARDEN_METRICS_PORT": "x"})
    Traceback (most recent call last):
    ...
    models.errors.ConfigError: DRIFTWARDEN_METRICS_PORT must be an integer, got 'x'
    >>> Settings.from_env({"DRIFTWARDEN_TOPIC_PREFIX": "t1."}).topic("labels")
    't1.labels'
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from models.errors import ConfigError
from models.policy import PolicyBook

__all__ = ["RECORDS_FORMATS", "ROLES", "Settings"]

_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")
#: One bootstrap server of DRIFTWARDEN_BROKER: ``kafka://`` (optional after the first), a
#: host name, IPv4 or [IPv6] address, and a port (9092 when left out).
#: What Kafka allows in a topic name, and how long one may be; DRIFTWARDEN_TOPIC_PREFIX and
#: DRIFTWARDEN_APP_ID name topics, the longest being Faust's leader topic of a role's group.
_TOPIC_CHARS = re.compile(r"[A-Za-z0-9._-]*")
_TOPIC_MAX = 249
_LONGEST_SUFFIX = "-monitor-__assignor-__leader"
_BROKER_URL = re.compile(r"(kafka://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::([0-9]+))?")
#: What a worker process runs: both stages, or one of them (README, "One process or two").
ROLES = ("all", "join", "monitor")
#: How the join sends predictions to the model stage: ``runs`` (columns, this release on)
#: or ``records`` (one each: what model stages of earlier releases read).
RECORDS_FORMATS = ("runs", "records")


@dataclass(frozen=True)
class Settings:
    """All configuration of a driftwarden process."""

    broker: str = "kafka://localhost:9092"
    topic_prefix: str = ""
    metrics_port: int = 9102
    metrics_host: str = "127.0.0.1"
    data_dir: Path = Path(".local/data")
    label_ttl_seconds: float = 7 * 86400.0
    # How long the join keeps a matched id to catch a duplicate; None: the label TTL.
    duplicate_window_seconds: float | None = None
    policy_file: Path | None = None
    partitions: int = 8
    replication_factor: int = 1
    max_models: int = 1000
    max_model_versions: int = 1000
    session_timeout_seconds: float = 10.0
    app_id: str = "driftwarden"
    store: str = "memory://"
    batch_size: int = 3000
    batch_seconds: float = 0.05
    fetch_bytes: int = 1024 * 1024
    fetch_min_bytes: int = 256 * 1024
    compression: str = "zstd"
    role: str = "all"
    records_format: str = "runs"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build Settings from ``DRIFTWARDEN_*`` variables (``os.environ`` by default)."""
        env = os.environ if env is None else env
        get = _Reader(env)
        settings = cls(
            broker=get.text("BROKER", cls.broker),
            topic_prefix=get.text("TOPIC_PREFIX", cls.topic_prefix),
            metrics_port=get.integer("METRICS_PORT", cls.metrics_port, 1, 65535),
            metrics_host=get.text("METRICS_HOST", cls.metrics_host),
            data_dir=Path(get.text("DATA_DIR", str(cls.data_dir))),
            label_ttl_seconds=get.number("LABEL_TTL_SECONDS", cls.label_ttl_seconds),
            duplicate_window_seconds=(get.number("DUPLICATE_WINDOW_SECONDS", 0.0) or None),
            policy_file=get.path("POLICY_FILE"),
            partitions=get.integer("PARTITIONS", cls.partitions, 1, 10_000),
            max_models=get.integer("MAX_MODELS", cls.max_models, 1, 1_000_000),
            max_model_versions=get.integer("MAX_MODEL_VERSIONS", cls.max_model_versions, 1,
                                           1_000_000),
            session_timeout_seconds=get.number("SESSION_TIMEOUT_SECONDS",
                                               cls.session_timeout_seconds),
            replication_factor=get.integer(
                "REPLICATION_FACTOR", cls.replication_factor, 1, 32),
            app_id=get.text("APP_ID", cls.app_id),
            store=get.text("STORE", cls.store),
            batch_size=get.integer("BATCH_SIZE", cls.batch_size, 1, 1_000_000),
            batch_seconds=get.number("BATCH_SECONDS", cls.batch_seconds),
            fetch_bytes=get.integer("FETCH_BYTES", cls.fetch_bytes, 64 * 1024, 256 * 1024 * 1024),
            fetch_min_bytes=get.integer("FETCH_MIN_BYTES", cls.fetch_min_bytes, 1,
                                        64 * 1024 * 1024),
            compression=get.choice("COMPRESSION", cls.compression, _COMPRESSIONS),
            role=get.choice("ROLE", cls.role, ROLES),
            records_format=get.choice("RECORDS_FORMAT", cls.records_format, RECORDS_FORMATS),
            security_protocol=get.choice("SECURITY_PROTOCOL", "PLAINTEXT", _SECURITY_PROTOCOLS),
            sasl_mechanism=get.choice("SASL_MECHANISM", "SCRAM-SHA-512", _SASL_MECHANISMS),
            sasl_username=env.get("DRIFTWARDEN_SASL_USERNAME"),
            sasl_password=env.get("DRIFTWARDEN_SASL_PASSWORD"),
            ssl_cafile=get.path("SSL_CAFILE"),
            ssl_certfile=get.path("SSL_CERTFILE"),
            ssl_keyfile=get.path("SSL_KEYFILE"),
        )
        settings = replace(settings, broker=_broker(settings.broker))
        window = settings.duplicate_window_seconds
        if window is not None and window > settings.label_ttl_seconds:
            raise ConfigError(
                f"DRIFTWARDEN_DUPLICATE_WINDOW_SECONDS must be at most "
                f"DRIFTWARDEN_LABEL_TTL_SECONDS ({settings.label_ttl_seconds:g}), got {window:g}")
        scheme, sep, _ = settings.store.partition("://")
        if not sep or scheme not in ("memory", "rocksdb"):
            raise ConfigError(
                f"DRIFTWARDEN_STORE must be memory:// or rocksdb://, got {settings.store!r}")
        for name, value in (("APP_ID", settings.app_id), ("METRICS_HOST", settings.metrics_host)):
            if not value.strip():
                raise ConfigError(f"DRIFTWARDEN_{name} must not be empty, got {value!r}")
        for name, value in (("TOPIC_PREFIX", settings.topic_prefix),
                            ("APP_ID", settings.app_id)):
            if not _TOPIC_CHARS.fullmatch(value):
                raise ConfigError(
                    f"DRIFTWARDEN_{name} may hold only ASCII letters, digits, '.', '_' and '-' "
                    f"(it is part of Kafka topic names), got {value!r}")
        stem = settings.topic(settings.app_id)
        if len(stem + _LONGEST_SUFFIX) > _TOPIC_MAX:
            raise ConfigError(
                f"DRIFTWARDEN_TOPIC_PREFIX and DRIFTWARDEN_APP_ID may be "
                f"{_TOPIC_MAX - len(_LONGEST_SUFFIX)} characters together (Kafka topic names "
                f"end at {_TOPIC_MAX}), got {len(stem)}")
        settings._check_tls()
        if settings.security_protocol.startswith("SASL") and not (
            settings.sasl_username and settings.sasl_password
        ):
            raise ConfigError(
                "DRIFTWARDEN_SASL_USERNAME and DRIFTWARDEN_SASL_PASSWORD are required "
                f"with DRIFTWARDEN_SECURITY_PROTOCOL={settings.security_protocol}"
            )
        return settings

    def make_data_dir(self) -> None:
        """Create DRIFTWARDEN_DATA_DIR (Faust's data, the rocksdb:// databases), or raise
        a ConfigError naming it: not a traceback once Kafka has been touched."""
        path = self.data_dir
        if path.exists() and not path.is_dir():
            raise ConfigError(f"DRIFTWARDEN_DATA_DIR: {str(path)!r} is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"DRIFTWARDEN_DATA_DIR: {str(path)!r} cannot be made: "
                              f"{exc.strerror or exc}") from None

    def _check_tls(self) -> None:
        """The TLS files exist, go with a protocol that uses them, and load (a bad file
        named here, not as a traceback at the first connection)."""
        files = {"SSL_CAFILE": self.ssl_cafile, "SSL_CERTFILE": self.ssl_certfile,
                 "SSL_KEYFILE": self.ssl_keyfile}
        for name, path in files.items():
            if path is None:
                continue
            if "SSL" not in self.security_protocol:
                raise ConfigError(
                    f"DRIFTWARDEN_{name} is set, but DRIFTWARDEN_SECURITY_PROTOCOL="
                    f"{self.security_protocol} does not use TLS (set SSL or SASL_SSL)")
            if not path.exists():
                raise ConfigError(f"DRIFTWARDEN_{name}: no such file {str(path)!r}")
            if not path.is_file():
                raise ConfigError(f"DRIFTWARDEN_{name}: {str(path)!r} is not a file")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ConfigError("DRIFTWARDEN_SSL_KEYFILE is set without DRIFTWARDEN_SSL_CERTFILE, "
                              "the certificate it is the key of")
        if "SSL" in self.security_protocol:
            self.aiokafka_security()  # raises a ConfigError naming a file that does not load

    def topic(self, name: str) -> str:
        """Full name of a topic of DESIGN.md section 2 (prefix applied)."""
        return f"{self.topic_prefix}{name}"

    @property
    def group(self) -> str:
        """The Faust app id of this process's role, which is its consumer group (prefix
        applied): ``APP_ID`` for a worker running both stages, ``APP_ID-join`` and
        ``APP_ID-monitor`` for the roles.

        >>> Settings(topic_prefix="t.", role="monitor").group
        't.driftwarden-monitor'
        """
        suffix = "" if self.role == "all" else f"-{self.role}"
        return self.topic(f"{self.app_id}{suffix}")

    @property
    def stages(self) -> frozenset[str]:
        """The stages this process runs: ``join``, ``monitor`` (the model stage), or both.

        >>> sorted(Settings().stages), sorted(Settings(role="join").stages)
        (['join', 'monitor'], ['join'])
        """
        return frozenset(("join", "monitor") if self.role == "all" else (self.role,))

    @property
    def duplicate_window(self) -> float:
        """Seconds of event time the join keeps a matched id (the label TTL unless
        ``DRIFTWARDEN_DUPLICATE_WINDOW_SECONDS`` says less).

        >>> Settings(label_ttl_seconds=600.0).duplicate_window
        600.0
        >>> Settings(label_ttl_seconds=600.0, duplicate_window_seconds=60.0).duplicate_window
        60.0
        """
        if self.duplicate_window_seconds is None:
            return self.label_ttl_seconds
        return self.duplicate_window_seconds

    def changelog(self, table: str) -> str:
        """A table's changelog topic: the same name whichever role owns the table, so
        state outlives a change between one process and two.

        >>> Settings(role="join").changelog("join")
        'driftwarden-join-changelog'
        """
        return self.topic(f"{self.app_id}-{table}-changelog")

    @property
    def servers(self) -> list[tuple[str, int]]:
        """(host, port) of each bootstrap server (an IPv6 address without brackets)."""
        out = []
        for url in self.broker.split(";"):
            host, _, port = url.removeprefix("kafka://").rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out

    @property
    def bootstrap_servers(self) -> str:
        """``host:port[,host:port]`` for aiokafka clients."""
        return ",".join(url.removeprefix("kafka://") for url in self.broker.split(";"))

    def policies(self) -> PolicyBook:
        """Per-model policy from DRIFTWARDEN_POLICY_FILE, or the defaults."""
        if self.policy_file is None:
            return PolicyBook()
        try:
            text = self.policy_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"DRIFTWARDEN_POLICY_FILE cannot be read: {exc}") from None
        except UnicodeDecodeError as exc:  # TOML is UTF-8
            raise ConfigError(f"DRIFTWARDEN_POLICY_FILE ({self.policy_file}) is not UTF-8: "
                              f"byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}"
                              ) from None
        return PolicyBook.from_toml(text, source=f"DRIFTWARDEN_POLICY_FILE ({self.policy_file})")

    def aiokafka_security(self) -> dict[str, Any]:
        """Security keyword arguments for aiokafka clients."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        import ssl

        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if "SSL" in self.security_protocol:
            try:
                context = ssl.create_default_context(
                    cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"DRIFTWARDEN_SSL_CAFILE ({self.ssl_cafile}) does not load "
                                  f"as PEM certificates: {exc}") from None
            if self.ssl_certfile:
                try:
                    context.load_cert_chain(
                        str(self.ssl_certfile),
                        str(self.ssl_keyfile) if self.ssl_keyfile else None)
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(
                        f"DRIFTWARDEN_SSL_CERTFILE ({self.ssl_certfile}) and _KEYFILE "
                        f"({self.ssl_keyfile}) do not load as a certificate and its key: "
                        f"{exc}") from None
            kwargs["ssl_context"] = context
        if self.security_protocol.startswith("SASL"):
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return kwargs


def _broker(value: str) -> str:
    """DRIFTWARDEN_BROKER as ``kafka://host:port;kafka://host:port``: servers separated by
    ``;`` or ``,``, ``kafka://`` on the first at least, 9092 where no port is given."""
    urls = []
    for i, item in enumerate(re.split(r"[;,]", value)):
        match = _BROKER_URL.fullmatch(item.strip())
        port = int(match[3]) if match and match[3] else 9092
        if match is None or (i == 0 and not match[1]) or not 0 < port < 65536:
            raise ConfigError(
                "DRIFTWARDEN_BROKER must be kafka://host:port (port 1-65535, 9092 if left "
                f"out), several separated by ';' or ',', got {value!r}")
        urls.append(f"kafka://{match[2]}:{port}")
    return ";".join(urls)


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str) -> str:
        return self.env.get(f"DRIFTWARDEN_{name}", default)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.env.get(f"DRIFTWARDEN_{name}")
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"DRIFTWARDEN_{name} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"DRIFTWARDEN_{name} must be between {low} and {high}, got {value}")
        return value

    def number(self, name: str, default: float) -> float:
        raw = self.env.get(f"DRIFTWARDEN_{name}")
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"DRIFTWARDEN_{name} must be a number, got {raw!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"DRIFTWARDEN_{name} must be a positive finite number, "
                              f"got {raw!r}")
        return value

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = self.env.get(f"DRIFTWARDEN_{name}", default)
        if value not in options:
            raise ConfigError(
                f"DRIFTWARDEN_{name} must be one of {', '.join(options)}, got {value!r}")
        return value

    def path(self, name: str) -> Path | None:
        raw = self.env.get(f"DRIFTWARDEN_{name}")
        return Path(raw) if raw else None
