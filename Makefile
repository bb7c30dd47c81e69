# The two commands a newcomer needs:  `make run`  and  `make test`.
# Both do all set-up themselves: a virtualenv in .venv, Python deps, Kafka jars from
# Maven Central, a local single-node KRaft broker on 127.0.0.1:9092.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KAFKA := deploy/kafka/kafka.sh

.PHONY: setup tools run test lint kafka-start kafka-stop kafka-status kafka-reset clean

# Root installs directly; otherwise through sudo when there is one.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "driftwarden needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed
	@$(KAFKA) start

# Broker + worker + simulated traffic with a drift; prints the retraining events.
run: setup
	DRIFTWARDEN_BROKER="$${DRIFTWARDEN_BROKER:-kafka://127.0.0.1:$${KAFKA_PORT:-9092}}" \
	  $(PY) -m streams demo

# Prometheus and promtool for the observability tests: Debian's package, installed once.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing Debian's prometheus package (real Prometheus for the tests)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install \
	    -y -qq --no-install-recommends prometheus >/dev/null; }

# Whole test suite against the local broker. Stops the broker afterwards if it started it.
test: $(VENV)/.installed tools
	@if $(KAFKA) status >/dev/null; then started=0; else started=1; fi; \
	$(KAFKA) start || exit 1; \
	DRIFTWARDEN_TEST_BROKER="$${DRIFTWARDEN_TEST_BROKER:-127.0.0.1:$${KAFKA_PORT:-9092}}" \
	  $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then $(KAFKA) stop; fi; \
	exit $$rc

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check models streams tests
	$(VENV)/bin/mypy

kafka-start:
	@$(KAFKA) start
kafka-stop:
	@$(KAFKA) stop
kafka-status:
	@$(KAFKA) status
# Stop the broker and delete its topics and data (not the jars): a fresh broker.
kafka-reset:
	@$(KAFKA) reset

clean: kafka-stop
	rm -rf $(VENV) .local
