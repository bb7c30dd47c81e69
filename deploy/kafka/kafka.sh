#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) for development and tests.
#
#   deploy/kafka/kafka.sh start    idempotent: resolves jars, formats storage once,
#                                  starts the broker, waits until it accepts connections
#   deploy/kafka/kafka.sh stop     stops the broker it started (SIGTERM, then SIGKILL)
#   deploy/kafka/kafka.sh status   prints "running pid=… port=…" or "stopped" (exit 3)
#   deploy/kafka/kafka.sh reset    stops it and deletes its data: topics, offsets (not jars)
#
# Jars come from Maven Central through Maven (pom.xml beside this file) and run on the
# machine's Java 17. Everything machine-local lives under $KAFKA_HOME_DIR (default
# .local/kafka at the repository root, git-ignored): libs/, data/, kafka.log, kafka.pid.
#
# Environment: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093), KAFKA_HOME_DIR,
# KAFKA_LIBS_DIR (jars, default $KAFKA_HOME_DIR/libs), KAFKA_HEAP (512m),
# KAFKA_START_TIMEOUT (90 seconds).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
port=${KAFKA_PORT:-9092}
controller_port=${KAFKA_CONTROLLER_PORT:-9093}
home=${KAFKA_HOME_DIR:-$root/.local/kafka}
heap=${KAFKA_HEAP:-512m}
timeout=${KAFKA_START_TIMEOUT:-90}
libs=${KAFKA_LIBS_DIR:-$home/libs}
data=$home/data
pidfile=$home/kafka.pid
log=$home/kafka.log
props=$home/server.properties

say() { echo "kafka.sh: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid=$(cat "$pidfile")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid: it must be our java process.
  grep -q "kafka.Kafka" "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

resolve_jars() {
  local stamp=$libs/.resolved
  if [ -f "$stamp" ] && [ "$stamp" -nt "$here/pom.xml" ]; then return 0; fi
  command -v mvn >/dev/null || { say "Maven (mvn) is required to resolve Kafka's jars"; exit 1; }
  say "resolving Kafka jars from Maven Central into $libs"
  rm -rf "$libs"
  mkdir -p "$libs"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$libs" -DincludeScope=runtime >"$home/mvn.log" 2>&1 || {
    say "Maven failed; see $home/mvn.log"; tail -20 "$home/mvn.log" >&2; exit 1; }
  touch "$stamp"
}

write_props() {
  sed -e "s#@PORT@#$port#g" -e "s#@CONTROLLER_PORT@#$controller_port#g" \
      -e "s#@DATA_DIR@#$data#g" "$here/server.properties.in" >"$props"
}

start() {
  mkdir -p "$home"
  local pid
  if pid=$(running_pid); then
    say "already running (pid $pid, port $port)"
    return 0
  fi
  if port_open "$port"; then
    say "port $port is already taken by a process this script did not start; stop it or set KAFKA_PORT"
    exit 1
  fi
  command -v java >/dev/null || { say "Java 17 (java) is required to run Kafka"; exit 1; }
  resolve_jars
  write_props
  if [ ! -f "$data/meta.properties" ]; then
    say "formatting storage in $data"
    mkdir -p "$data"
    local cluster_id
    cluster_id=$(java -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>>"$log" | tail -1)
    java -cp "$libs/*" -Dlog4j2.configurationFile="$here/log4j2.yaml" \
      kafka.tools.StorageTool format -t "$cluster_id" -c "$props" >>"$log" 2>&1
  fi
  say "starting broker on 127.0.0.1:$port (log: $log)"
  # Readiness is judged on this run's log lines only, not an earlier run's.
  local log_start
  log_start=$(( $(stat -c %s "$log" 2>/dev/null || echo 0) + 1 ))
  # setsid: the broker must outlive the shell that started it, and not get its signals.
  setsid java "-Xmx$heap" "-Xms$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/log4j2.yaml" \
    -cp "$libs/*" kafka.Kafka "$props" >>"$log" 2>&1 </dev/null &
  local launched=$!
  echo "$launched" >"$pidfile"
  echo "$port" >"$home/kafka.port"
  local waited=0
  # grep reads a process substitution: in a pipe its early exit would SIGPIPE tail and
  # pipefail would turn the match into a failure.
  until port_open "$port" && grep -q "Kafka Server started" <(tail -c "+$log_start" "$log"); do
    # kill -0, not running_pid: until the fork has exec'd java its cmdline is still bash.
    if ! kill -0 "$launched" 2>/dev/null; then
      say "broker exited during start-up; last lines of $log:"; tail -20 "$log" >&2; exit 1
    fi
    if [ "$waited" -ge "$timeout" ]; then
      say "broker did not accept connections within ${timeout}s; see $log"; exit 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  say "running (pid $(cat "$pidfile"), port $port)"
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$pidfile"
    say "not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true  # it may have exited meanwhile
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "broker did not stop within 30 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  fi
  rm -f "$pidfile"
  say "stopped"
}

status() {
  local pid
  if pid=$(running_pid); then
    echo "running pid=$pid port=$(cat "$home/kafka.port" 2>/dev/null || echo "$port")"
  else
    echo "stopped"
    return 3
  fi
}

# Every topic, offset and log segment the broker holds, gone; the jars stay. The
# development broker keeps every topic the tests and benches create (15,446 partitions
# and 23 GB here after weeks), and a broker holding that many slows every write.
reset() {
  stop
  rm -rf "$data"
  say "removed $data: the next start formats empty storage (jars in $libs kept)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  reset) reset ;;
  *) echo "usage: $0 start|stop|status|reset" >&2; exit 2 ;;
esac
