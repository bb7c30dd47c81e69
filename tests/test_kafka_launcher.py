"""Integration test of deploy/kafka/kafka.sh, the local broker launcher (DESIGN.md section 8).

Runs a second, throw-away broker on alternate ports (19092/19093) with its state under
pytest's tmp_path, so the development broker on 9092 is never touched. The jars are the
ones the development broker already resolved (.local/kafka/libs): no Maven download.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "kafka" / "kafka.sh"
POM = ROOT / "deploy" / "kafka" / "pom.xml"
LIBS = ROOT / ".local" / "kafka" / "libs"
PORT = 19092
CONTROLLER_PORT = 19093
START_TIMEOUT = 90  # KAFKA_START_TIMEOUT given to kafka.sh; ours is larger


@dataclass
class Launcher:
    home: Path
    env: dict[str, str]

    @property
    def pidfile(self) -> Path:
        return self.home / "kafka.pid"

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                ["bash", str(SCRIPT), command], env=self.env, cwd=ROOT, text=True,
                capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`kafka.sh {command}` did not finish within {timeout}s "
                        f"(stderr: {exc.stderr!r}); log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        log = self.home / "kafka.log"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else "(no log)"


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _brokers_for(props: Path) -> list[int]:
    """Pids of java processes running kafka.Kafka with this server.properties."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" in argv and str(props).encode() in argv:
            pids.append(int(entry.name))
    return pids


def _describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}; stdout={result.stdout!r}; stderr={result.stderr!r}"


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    if shutil.which("java") is None:
        pytest.fail("java is not on PATH: kafka.sh runs the broker on the machine's Java 17",
                    pytrace=False)
    stamp = LIBS / ".resolved"
    if not stamp.exists() or stamp.stat().st_mtime <= POM.stat().st_mtime:
        # kafka.sh would re-resolve, i.e. `rm -rf` the jars under the running dev broker.
        pytest.fail(f"Kafka jars in {LIBS} are missing or older than {POM.name}: run "
                    "`make kafka-stop kafka-start` (or `make test`) to resolve them first",
                    pytrace=False)
    for port in (PORT, CONTROLLER_PORT):
        if _port_open(port):
            pytest.fail(f"port {port} is taken; the launcher test needs it free", pytrace=False)

    home = tmp_path / "kafka"
    env = {**os.environ, "KAFKA_PORT": str(PORT), "KAFKA_CONTROLLER_PORT": str(CONTROLLER_PORT),
           "KAFKA_HOME_DIR": str(home), "KAFKA_LIBS_DIR": str(LIBS), "KAFKA_HEAP": "256m",
           "KAFKA_START_TIMEOUT": str(START_TIMEOUT)}
    launcher = Launcher(home, env)
    try:
        yield launcher
    finally:
        launcher.run("stop", timeout=90)
        # Last resort, only for a broker of this test (its properties file is in tmp_path).
        for pid in _brokers_for(home / "server.properties"):
            os.kill(pid, signal.SIGKILL)


def test_start_is_idempotent_and_stop_cleans_up(launcher: Launcher) -> None:
    props = launcher.home / "server.properties"

    # start: exits 0, broker accepts connections, pid recorded.
    first = launcher.run("start", timeout=START_TIMEOUT + 60)
    assert first.returncode == 0, f"start failed: {_describe(first)}\n{launcher.log_tail()}"
    assert _port_open(PORT), f"start returned but 127.0.0.1:{PORT} refuses connections"
    pid = int(launcher.pidfile.read_text().strip())
    assert _alive(pid)
    assert _brokers_for(props) == [pid], "the recorded pid is not the broker's java process"
    assert "Kafka Server started" in (launcher.home / "kafka.log").read_text()

    # start again: harmless, same broker, no second java process.
    second = launcher.run("start")
    assert second.returncode == 0, f"second start failed: {_describe(second)}"
    assert f"already running (pid {pid}, port {PORT})" in second.stderr, _describe(second)
    assert int(launcher.pidfile.read_text().strip()) == pid
    assert _brokers_for(props) == [pid], "a second start launched another broker"

    # status while running.
    status = launcher.run("status")
    assert status.returncode == 0, _describe(status)
    assert status.stdout.strip() == f"running pid={pid} port={PORT}"

    # stop: exits 0, port closed, process gone, pid file removed, status says stopped.
    stop = launcher.run("stop", timeout=90)
    assert stop.returncode == 0, f"stop failed: {_describe(stop)}"
    assert not _alive(pid), f"broker pid {pid} still exists after stop"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not _port_open(PORT), f"127.0.0.1:{PORT} still accepts connections after stop"
    assert not launcher.pidfile.exists()
    stopped = launcher.run("status")
    assert stopped.returncode == 3, _describe(stopped)
    assert stopped.stdout.strip() == "stopped"

    # stop again: harmless.
    again = launcher.run("stop")
    assert again.returncode == 0, f"second stop failed: {_describe(again)}"
    assert not _brokers_for(props)


def test_usage_error(launcher: Launcher) -> None:
    result = launcher.run("restart")
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert not launcher.home.exists(), "a usage error must not create state"



def test_restart_in_the_same_home_waits_for_the_new_broker(launcher: Launcher) -> None:
    # The log keeps the first run's "Kafka Server started"; the second start must judge
    # readiness on its own lines (and succeed), keeping the formatted storage.
    for round_ in (1, 2):
        started = launcher.run("start", timeout=START_TIMEOUT + 60)
        assert started.returncode == 0, f"start {round_}: {_describe(started)}"
        assert _port_open(PORT)
        assert "formatting storage" in started.stderr if round_ == 1 else (
            "formatting storage" not in started.stderr)
        stopped = launcher.run("stop", timeout=90)
        assert stopped.returncode == 0, f"stop {round_}: {_describe(stopped)}"
    log = (launcher.home / "kafka.log").read_text()
    assert log.count("Kafka Server started") == 2


def test_reset_stops_the_broker_and_the_next_start_has_no_topics(launcher: Launcher) -> None:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def admin(create: bool) -> set[str]:
        client = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{PORT}")
        await client.start()
        try:
            if create:
                await client.create_topics([NewTopic("reset-probe", 3, 1)])
            return set(await client.list_topics())
        finally:
            await client.close()

    started = launcher.run("start", timeout=START_TIMEOUT + 60)
    assert started.returncode == 0, _describe(started)
    pid = int(launcher.pidfile.read_text().strip())
    assert "reset-probe" in asyncio.run(admin(create=True))

    reset = launcher.run("reset", timeout=90)
    assert reset.returncode == 0, _describe(reset)
    assert not _alive(pid) and not _port_open(PORT)
    # The data goes; the rest of its home (log, properties; by default the jars) stays.
    assert not (launcher.home / "data").exists()
    assert (launcher.home / "kafka.log").exists()
    assert (launcher.home / "server.properties").exists()

    again = launcher.run("start", timeout=START_TIMEOUT + 60)
    assert again.returncode == 0, _describe(again)
    assert "formatting storage" in again.stderr
    assert "reset-probe" not in asyncio.run(admin(create=False))
